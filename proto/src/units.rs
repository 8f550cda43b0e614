//! Sizes as people read them, one rule for the scheduler's messages and the
//! CLI's tables.

/// `bytes` in the largest binary unit that keeps it at least 1, with one
/// decimal when it is not whole: `("1.5", "GiB")`, `("512", "MiB")`. Below
/// 1 KiB: `None` (the caller says bytes its own way).
pub fn binary_size(bytes: u64) -> Option<(String, &'static str)> {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return None;
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text).to_string();
    Some((text, UNITS[unit]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_the_largest_whole_unit() {
        assert_eq!(binary_size(1023), None);
        assert_eq!(binary_size(1024), Some(("1".into(), "KiB")));
        assert_eq!(binary_size(3 << 29), Some(("1.5".into(), "GiB")));
        assert_eq!(binary_size(512 << 30), Some(("512".into(), "GiB")));
        assert_eq!(binary_size(u64::MAX).map(|s| s.1), Some("PiB"));
    }
}
