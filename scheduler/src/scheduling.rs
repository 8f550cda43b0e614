//! The `[scheduling]` table of `scheduler.toml`: priority classes, fair
//! share, backfill and preemption. Every key is documented in
//! `config/scheduler.toml`. [`SchedulingConfig::policy`] turns it into the
//! planner's [`Policy`].

use crate::planner::Policy;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

fn default_classes() -> BTreeMap<String, u32> {
    Policy::default().classes
}
fn default_class() -> String {
    Policy::default().default_class
}
fn default_half_life() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_accrual() -> Duration {
    Duration::from_secs(30)
}
fn default_reservations() -> usize {
    Policy::default().reservations
}
fn default_true() -> bool {
    true
}
fn default_preemptors() -> usize {
    Policy::default().preemptors
}
/// SIGTERM's number (15 on every Linux architecture).
const SIGTERM: i32 = 15;

fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_max_grace() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_min_runtime() -> Duration {
    Duration::from_millis(Policy::default().min_runtime_ms as u64)
}

/// `[scheduling]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchedulingConfig {
    /// Priority class name → weight.
    #[serde(default = "default_classes")]
    pub priority_classes: BTreeMap<String, u32>,
    /// Class of jobs that name none.
    #[serde(default = "default_class")]
    pub default_priority: String,
    /// Half-life of past usage in fair share.
    #[serde(default = "default_half_life", with = "humantime_serde")]
    pub fair_share_half_life: Duration,
    /// How often the leader charges running jobs' GPU-seconds.
    #[serde(default = "default_accrual", with = "humantime_serde")]
    pub usage_interval: Duration,
    /// Blocked gangs per pass that get a reservation.
    #[serde(default = "default_reservations")]
    pub backfill_reservations: usize,
    /// Whether the scheduler preempts at all.
    #[serde(default = "default_true")]
    pub preemption: bool,
    /// Blocked gangs per pass that may preempt.
    #[serde(default = "default_preemptors")]
    pub preemptors_per_pass: usize,
    /// A job that has run less than this is never preempted.
    #[serde(default = "default_min_runtime", with = "humantime_serde")]
    pub min_runtime: Duration,
    /// Time between a job's stop signal and SIGKILL when the job names none.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub default_grace: Duration,
    /// The longest grace a job may ask for; longer requests are capped.
    #[serde(default = "default_max_grace", with = "humantime_serde")]
    pub max_grace: Duration,
    /// Drain a node when one of its GPUs fails (the failed GPU is always
    /// excluded from placement).
    #[serde(default)]
    pub drain_on_gpu_fault: bool,
    /// The largest share of the leader's time long planning passes may take.
    #[serde(default = "default_planner_share")]
    pub planner_share: f64,
}

fn default_planner_share() -> f64 {
    0.1
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        SchedulingConfig {
            priority_classes: default_classes(),
            default_priority: default_class(),
            fair_share_half_life: default_half_life(),
            usage_interval: default_accrual(),
            backfill_reservations: default_reservations(),
            preemption: true,
            preemptors_per_pass: default_preemptors(),
            min_runtime: default_min_runtime(),
            default_grace: default_grace(),
            max_grace: default_max_grace(),
            drain_on_gpu_fault: false,
            planner_share: default_planner_share(),
        }
    }
}

impl SchedulingConfig {
    /// Check values that parse but make no sense; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.priority_classes.is_empty() {
            return Err("key `scheduling.priority_classes`: define at least one class".into());
        }
        for name in self.priority_classes.keys() {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err(format!(
                    "key `scheduling.priority_classes.{name}`: class names use a-z, 0-9 and '-'"
                ));
            }
        }
        if !self.priority_classes.contains_key(&self.default_priority) {
            return Err(format!(
                "key `scheduling.default_priority`: {:?} is not in `scheduling.priority_classes`",
                self.default_priority
            ));
        }
        if self.fair_share_half_life.is_zero() {
            return Err("key `scheduling.fair_share_half_life`: must be greater than 0".into());
        }
        if self.usage_interval.is_zero() {
            return Err("key `scheduling.usage_interval`: must be greater than 0".into());
        }
        if !(self.planner_share > 0.0 && self.planner_share <= 1.0) {
            return Err(format!(
                "key `scheduling.planner_share`: {} is not in (0, 1]",
                self.planner_share
            ));
        }
        if self.default_grace > self.max_grace {
            return Err(
                "key `scheduling.default_grace`: must not be longer than `scheduling.max_grace`"
                    .into(),
            );
        }
        Ok(())
    }

    /// The planner's policy.
    pub fn policy(&self) -> Policy {
        Policy {
            classes: self.priority_classes.clone(),
            default_class: self.default_priority.clone(),
            reservations: self.backfill_reservations,
            preemption: self.preemption,
            preemptors: self.preemptors_per_pass,
            min_runtime_ms: self.min_runtime.as_millis().min(i64::MAX as u128) as i64,
        }
    }

    /// The signal and grace a job is stopped with: its own, or SIGTERM and
    /// `default_grace`; the grace capped at `max_grace`.
    pub fn stop_of(&self, l: &crate::model::Lifecycle) -> (i32, Duration) {
        let grace = l
            .grace_secs
            .map_or(self.default_grace, Duration::from_secs)
            .min(self.max_grace);
        (l.stop_signal.unwrap_or(SIGTERM), grace)
    }

    /// Whether `class` may be named by a job (empty means the default).
    pub fn check_class(&self, class: &str) -> Result<(), String> {
        if class.is_empty() || self.priority_classes.contains_key(class) {
            return Ok(());
        }
        let known: Vec<&str> = self.priority_classes.keys().map(String::as_str).collect();
        Err(format!(
            "priority: unknown class {class:?} (known: {})",
            known.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::SchedulerConfig;
    use crate::model::Lifecycle;
    use std::time::Duration;

    #[test]
    fn stop_policy_defaults_and_caps() {
        let s = super::SchedulingConfig::default();
        assert_eq!(
            s.stop_of(&Lifecycle::default()),
            (15, Duration::from_secs(30))
        );
        let asked = Lifecycle {
            stop_signal: Some(10),
            grace_secs: Some(24 * 3600),
            ..Lifecycle::default()
        };
        assert_eq!(
            s.stop_of(&asked),
            (10, Duration::from_secs(15 * 60)),
            "capped"
        );
        let zero = Lifecycle {
            grace_secs: Some(0),
            ..Lifecycle::default()
        };
        assert_eq!(s.stop_of(&zero).1, Duration::ZERO, "0 means kill at once");
    }
    use std::path::Path;

    #[test]
    fn scheduling_table_parses_and_is_checked() {
        let cfg = SchedulerConfig::parse(
            "[scheduling]\ndefault_priority = \"batch\"\n\
             priority_classes = { batch = 10, urgent = 1000 }\nmin_runtime = \"2m\"\n",
            Path::new("s.toml"),
        )
        .unwrap();
        let p = cfg.scheduling.policy();
        assert_eq!(p.weight("urgent"), 1000);
        assert_eq!(p.weight(""), 10);
        assert_eq!(p.min_runtime_ms, 120_000);
        let e = SchedulerConfig::parse(
            "[scheduling]\ndefault_priority = \"nope\"\n",
            Path::new("s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("scheduling.default_priority"), "{e}");
        let e = SchedulerConfig::parse(
            "[scheduling]\ndefault_grace = \"20m\"\nmax_grace = \"10m\"\n",
            Path::new("s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("scheduling.default_grace"), "{e}");
        assert_eq!(cfg.scheduling.planner_share, 0.1);
        for bad in ["0", "1.5", "-0.2", "nan"] {
            let e = SchedulerConfig::parse(
                &format!("[scheduling]\nplanner_share = {bad}\n"),
                Path::new("s.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("scheduling.planner_share"), "{bad}: {e}");
        }
        let e = SchedulerConfig::parse("[scheduling]\nbogus = 1\n", Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
