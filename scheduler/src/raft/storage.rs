//! `raft::Storage` on sled: the log, hard state, conf state and the latest
//! snapshot, in one sled database inside the scheduler's data folder.
//!
//! Layout: tree `entries` holds the log in records, one per append: the key
//! is the big-endian index of the record's first entry, the value its entries
//! as length-prefixed protobuf `Entry`s ([`encode_record`]). Writing a
//! `Ready`'s entries is one sled insert, and compacting the log removes one
//! key per record, not one per entry. Tree `meta` holds `hard_state`,
//! `conf_state` and `snap_meta` (index and term of the latest snapshot); tree
//! `snapshot` holds `snap_data`, the serialized state machine. The snapshot has a tree of its own because sled rewrites a
//! tree's node whole from time to time: next to the hard state, written on
//! every `Ready`, megabytes of snapshot would be rewritten with it. Writes of
//! one `Ready` go in with [`SledStorage::append`] and friends and become
//! durable together with one [`SledStorage::flush`]. (Data folders written
//! with one key per entry, tree `log`, are converted when opened.)
//!
//! Everything raft-rs asks for on its hot path is answered from memory: the
//! hard and conf state, the snapshot's index and term, the last index, and
//! the most recent entries ([`CACHE_ENTRIES`] of them, up to
//! [`CACHE_BYTES`]). sled is read only for older entries (a follower far
//! behind) and when the node starts.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most entries kept in memory.
pub const CACHE_ENTRIES: usize = 16_384;
/// Most bytes of entries kept in memory.
pub const CACHE_BYTES: usize = 64 << 20;

/// Errors of the sled-backed Raft storage, each naming the database path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft storage at {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("raft storage at {path}: corrupt record {key}: {message}")]
    Corrupt {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A test's crash point stopped a write (see [`crash_point`]).
    #[error("simulated crash at \"{0}\"")]
    Crashed(&'static str),
}

/// What is held in memory, always equal to what sled holds (or will hold
/// after the next flush).
#[derive(Debug, Default)]
struct Cache {
    hard: HardState,
    /// `hard` has a commit index sled does not hold yet (see `set_commit`).
    hard_unwritten: bool,
    conf: Option<ConfState>,
    snap: SnapshotMetadata,
    /// Index of the last entry (the snapshot's index when the log is empty).
    last: u64,
    /// The newest entries, contiguous and ending at `last`.
    recent: VecDeque<Entry>,
    recent_bytes: usize,
}

/// What an entry counts against [`CACHE_BYTES`].
fn weight(e: &Entry) -> usize {
    e.data.len() + e.context.len()
}

impl Cache {
    fn first(&self) -> u64 {
        self.snap.index + 1
    }

    /// The cached entry at `idx`, if it is cached.
    fn get(&self, idx: u64) -> Option<&Entry> {
        let front = self.recent.front()?.index;
        if idx < front {
            return None;
        }
        self.recent.get((idx - front) as usize)
    }

    /// Drop cached entries from `idx` on.
    fn truncate_from(&mut self, idx: u64) {
        while self.recent.back().is_some_and(|e| e.index >= idx) {
            let e = self.recent.pop_back().expect("non-empty");
            self.recent_bytes -= weight(&e);
        }
    }

    /// Drop cached entries up to and including `idx`.
    fn compact_to(&mut self, idx: u64) {
        while self.recent.front().is_some_and(|e| e.index <= idx) {
            let e = self.recent.pop_front().expect("non-empty");
            self.recent_bytes -= weight(&e);
        }
    }

    /// Forget every cached entry.
    fn clear(&mut self) {
        self.recent.clear();
        self.recent_bytes = 0;
    }

    fn push(&mut self, e: Entry) {
        self.recent_bytes += weight(&e);
        self.recent.push_back(e);
        while self.recent.len() > CACHE_ENTRIES || self.recent_bytes > CACHE_BYTES {
            let e = self.recent.pop_front().expect("non-empty");
            self.recent_bytes -= weight(&e);
        }
    }
}

/// Raft storage in sled. Cheap to clone (sled trees are handles; the cache
/// is shared).
#[derive(Clone)]
pub struct SledStorage {
    path: PathBuf,
    db: sled::Db,
    db_log: sled::Tree,
    meta: sled::Tree,
    snapshot: sled::Tree,
    cache: Arc<Mutex<Cache>>,
    /// raft-rs asked for a snapshot this storage could not give (none yet,
    /// too old, or one whose configuration lacks the recipient): the driver
    /// takes one at once (see [`SledStorage::take_snapshot_wanted`]).
    wanted: Arc<std::sync::atomic::AtomicBool>,
}

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAP_META: &str = "snap_meta";
const SNAP_DATA: &str = "snap_data";
/// Present while this member has not yet caught up with a leader since its
/// data folder was begun (see `raft/mod.rs`, "A member that lost its data").
const CATCHING_UP: &str = "catching_up";

fn idx_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn store_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

/// Crash points inside a snapshot's transaction: a test arms one with
/// [`crash::arm`] and the transaction stops there, as a process killed
/// between two of the writes would. (Outside tests they do nothing.)
pub(crate) const CRASH_SNAPSHOT_DATA: &str = "snapshot: bytes written, metadata not";
pub(crate) const CRASH_SNAPSHOT_META: &str = "snapshot: metadata written, hard state not";
pub(crate) const CRASH_SNAPSHOT_HARD_STATE: &str = "snapshot: hard state written, log not";

#[cfg(test)]
pub(crate) mod crash {
    use std::cell::Cell;

    thread_local! {
        static ARMED: Cell<Option<&'static str>> = const { Cell::new(None) };
    }

    /// Make the next pass through `point` on this thread fail.
    pub(crate) fn arm(point: &'static str) {
        ARMED.with(|a| a.set(Some(point)));
    }

    /// Whether `point` is armed (disarming it).
    pub(crate) fn hit(point: &'static str) -> bool {
        ARMED.with(|a| {
            if a.get() == Some(point) {
                a.set(None);
                true
            } else {
                false
            }
        })
    }
}

fn crash_point(
    point: &'static str,
) -> Result<(), sled::transaction::ConflictableTransactionError<&'static str>> {
    #[cfg(test)]
    if crash::hit(point) {
        return Err(sled::transaction::ConflictableTransactionError::Abort(
            point,
        ));
    }
    let _ = point;
    Ok(())
}

impl SledStorage {
    /// Open (or create) the database in `dir`.
    pub fn open(dir: &Path) -> Result<SledStorage, StoreError> {
        let path = dir.join("raft");
        let wrap = |source| StoreError::Sled {
            path: path.clone(),
            source,
        };
        let db = sled::Config::new()
            .path(&path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(wrap)?;
        let db_log = db.open_tree("entries").map_err(wrap)?;
        let meta = db.open_tree("meta").map_err(wrap)?;
        let snapshot = db.open_tree("snapshot").map_err(wrap)?;
        let s = SledStorage {
            path,
            db,
            db_log,
            meta,
            snapshot,
            cache: Arc::default(),
            wanted: Arc::default(),
        };
        s.move_snapshot_data()?;
        s.convert_entry_per_key_log()?;
        s.load_cache()?;
        Ok(s)
    }

    /// Data folders written with one key per entry (tree `log`): write those
    /// entries as records and drop the old tree.
    fn convert_entry_per_key_log(&self) -> Result<(), StoreError> {
        if !self.db.tree_names().iter().any(|n| &n[..] == b"log") {
            return Ok(());
        }
        let old = self.sled(self.db.open_tree("log"))?;
        let put = |run: &[Entry]| match run.first() {
            Some(first) => self
                .sled(self.db_log.insert(idx_key(first.index), encode_record(run)))
                .map(|_| ()),
            None => Ok(()),
        };
        // Records of up to 256 contiguous entries.
        let mut run: Vec<Entry> = Vec::new();
        for item in old.iter() {
            let (k, v) = self.sled(item)?;
            let e = self.decode(key_index(&k), &v)?;
            if run.last().is_some_and(|l| l.index + 1 != e.index) || run.len() >= 256 {
                put(&run)?;
                run.clear();
            }
            run.push(e);
        }
        put(&run)?;
        self.flush()?;
        self.sled(self.db.drop_tree("log"))?;
        self.flush()
    }

    /// Data folders written before the snapshot had a tree of its own keep
    /// it in `meta`: move it.
    fn move_snapshot_data(&self) -> Result<(), StoreError> {
        if let Some(data) = self.sled(self.meta.get(SNAP_DATA))? {
            self.sled(self.snapshot.insert(SNAP_DATA, data))?;
            self.sled(self.meta.remove(SNAP_DATA))?;
            self.flush()?;
        }
        Ok(())
    }

    /// Fill the cache from disk: the metadata, and the newest entries.
    fn load_cache(&self) -> Result<(), StoreError> {
        let mut c = Cache {
            hard: self.read(HARD_STATE)?.unwrap_or_default(),
            conf: self.read(CONF_STATE)?,
            snap: self.read(SNAP_META)?.unwrap_or_default(),
            ..Default::default()
        };
        // A snapshot holds only committed entries. Data folders written
        // before the snapshot and hard state were one transaction can hold a
        // durable commit below it, which raft-rs refuses at start.
        c.hard.commit = c.hard.commit.max(c.snap.index);
        c.last = c.snap.index;
        if let Some((_, v)) = self.sled(self.db_log.last())? {
            if let Some(e) = self.decode_record(&v)?.last() {
                c.last = e.index.max(c.snap.index);
            }
        }
        let mut newest = Vec::new();
        let mut bytes = 0;
        'records: for item in self.db_log.iter().rev() {
            let (_, v) = self.sled(item)?;
            for e in self.decode_record(&v)?.into_iter().rev() {
                if e.index <= c.snap.index || newest.len() >= CACHE_ENTRIES || bytes >= CACHE_BYTES
                {
                    break 'records;
                }
                bytes += weight(&e);
                newest.push(e);
            }
        }
        for e in newest.into_iter().rev() {
            c.push(e);
        }
        *self.cache() = c;
        Ok(())
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether nothing was ever stored (a brand-new node).
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.cache().conf.is_none())
    }

    /// Set the conf state alone (the layout older schedulers bootstrapped
    /// with: no snapshot, the log from index 1). Tests of the log use it.
    #[cfg(test)]
    pub fn bootstrap(&self, voters: Vec<u64>) -> Result<(), StoreError> {
        let cs = ConfState {
            voters,
            ..Default::default()
        };
        self.set_conf_state(&cs)?;
        self.flush()
    }

    /// Begin a brand-new member's storage with the cluster's initial
    /// snapshot (its first configuration and the empty state, see
    /// `raft::initial_snapshot`), durably.
    pub fn bootstrap_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        self.apply_snapshot(snap)?;
        self.flush()
    }

    /// Whether this member is still catching up since its data folder was
    /// begun (it does not vote for a candidate with data until it has).
    pub fn catching_up(&self) -> Result<bool, StoreError> {
        Ok(self.sled(self.meta.get(CATCHING_UP))?.is_some())
    }

    /// Mark (or unmark) this member as catching up; durable with the next
    /// flush.
    pub fn set_catching_up(&self, on: bool) -> Result<(), StoreError> {
        if on {
            self.sled(self.meta.insert(CATCHING_UP, &[1u8][..]))?;
        } else {
            self.sled(self.meta.remove(CATCHING_UP))?;
        }
        Ok(())
    }

    /// Whether raft-rs asked for a snapshot this storage could not give
    /// since the last call (clears the request).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.wanted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    fn read<M: protobuf::Message>(&self, key: &str) -> Result<Option<M>, StoreError> {
        let raw = self.sled(self.meta.get(key))?;
        raw.map(|b| {
            M::parse_from_bytes(&b).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                key: key.to_string(),
                message: e.to_string(),
            })
        })
        .transpose()
    }

    fn write<M: protobuf::Message>(&self, key: &str, m: &M) -> Result<(), StoreError> {
        let bytes = m.write_to_bytes().map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            key: key.to_string(),
            message: e.to_string(),
        })?;
        self.sled(self.meta.insert(key, bytes))?;
        Ok(())
    }

    fn sled<T>(&self, r: Result<T, sled::Error>) -> Result<T, StoreError> {
        r.map_err(|source| StoreError::Sled {
            path: self.path.clone(),
            source,
        })
    }

    fn decode(&self, idx: u64, raw: &[u8]) -> Result<Entry, StoreError> {
        Entry::parse_from_bytes(raw).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            key: format!("log/{idx}"),
            message: e.to_string(),
        })
    }

    fn decode_record(&self, raw: &[u8]) -> Result<Vec<Entry>, StoreError> {
        decode_record(raw).map_err(|message| StoreError::Corrupt {
            path: self.path.clone(),
            key: "entries record".into(),
            message,
        })
    }

    /// The record that holds `idx`, if the log has one: its key and entries.
    fn record_holding(&self, idx: u64) -> Result<Option<(u64, Vec<Entry>)>, StoreError> {
        let Some((k, v)) = self.sled(self.db_log.range(..=idx_key(idx)).next_back().transpose())?
        else {
            return Ok(None);
        };
        let entries = self.decode_record(&v)?;
        Ok(entries
            .last()
            .is_some_and(|e| e.index >= idx)
            .then(|| (key_index(&k), entries)))
    }

    /// Make everything written so far durable (one fsync per `Ready`).
    pub fn flush(&self) -> Result<(), StoreError> {
        let unwritten = {
            let mut c = self.cache();
            std::mem::take(&mut c.hard_unwritten).then(|| c.hard.clone())
        };
        if let Some(hs) = unwritten {
            self.write(HARD_STATE, &hs)?;
        }
        self.sled(self.db.flush().map(|_| ()))
    }

    /// Append entries, dropping any conflicting suffix of the log.
    pub fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut cache = self.cache();
        let mut batch = sled::Batch::default();
        if first.index <= cache.last {
            // A conflicting suffix: records from `first` on go, and the
            // record that holds `first` keeps only what comes before it.
            if let Some((key, mut held)) = self.record_holding(first.index)? {
                held.retain(|e| e.index < first.index);
                if held.is_empty() {
                    batch.remove(&idx_key(key));
                } else {
                    batch.insert(&idx_key(key), encode_record(&held));
                }
            }
            for k in self.db_log.range(idx_key(first.index)..).keys() {
                batch.remove(self.sled(k)?);
            }
        }
        batch.insert(&idx_key(first.index), encode_record(entries));
        self.sled(self.db_log.apply_batch(batch))?;
        cache.truncate_from(first.index);
        if cache
            .recent
            .back()
            .is_none_or(|e| e.index + 1 != first.index)
        {
            // Not contiguous with what is cached (the cache had been trimmed
            // past the truncation point): start afresh from these entries.
            cache.clear();
        }
        for e in entries {
            cache.push(e.clone());
        }
        cache.last = entries.last().map_or(cache.last, |e| e.index);
        Ok(())
    }

    /// Persist the hard state.
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StoreError> {
        self.write(HARD_STATE, hs)?;
        let mut c = self.cache();
        c.hard = hs.clone();
        c.hard_unwritten = false;
        Ok(())
    }

    /// Record a new commit index; it reaches sled with the next flush.
    /// Nothing waits on it being durable: a node that restarts with an older
    /// commit index learns the newer one from the leader (or, alone,
    /// commits again), and applies from its snapshot on.
    pub fn set_commit(&self, commit: u64) {
        let mut c = self.cache();
        if c.hard.commit != commit {
            c.hard.commit = commit;
            c.hard_unwritten = true;
        }
    }

    /// Persist the conf state (after a membership change is applied).
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StoreError> {
        self.write(CONF_STATE, cs)?;
        self.cache().conf = Some(cs.clone());
        Ok(())
    }

    /// Install a snapshot received from the leader: the log before it is gone.
    /// The snapshot's bytes and metadata, the hard state, the conf state and
    /// the cleared log are one sled transaction: a crash leaves either the
    /// old storage or the new, never a snapshot whose metadata names other
    /// bytes or a hard state whose commit lies outside the log.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        let mut hs = self.cache().hard.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        // Entries after the snapshot may conflict with the leader's; drop all.
        let mut clear = sled::Batch::default();
        for k in self.db_log.iter().keys() {
            clear.remove(self.sled(k)?);
        }
        self.commit_snapshot(meta, &snap.data, &hs, Some(meta.get_conf_state()), clear)?;
        let mut cache = self.cache();
        cache.clear();
        cache.last = meta.index;
        cache.conf = Some(meta.get_conf_state().clone());
        Ok(())
    }

    /// Record a snapshot of our own state machine at `index` and compact the
    /// log up to it, in one sled transaction (see [`Self::apply_snapshot`]).
    pub fn save_snapshot(
        &self,
        index: u64,
        term: u64,
        conf: &ConfState,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf.clone());
        // Every record that ends at or before `index` goes; the one that
        // holds `index` and entries after it (the last key here) stays.
        let mut keys = self.sled(
            self.db_log
                .range(..=idx_key(index))
                .keys()
                .collect::<Result<Vec<_>, _>>(),
        )?;
        let straddles = self
            .record_holding(index)?
            .is_some_and(|(_, held)| held.last().is_some_and(|e| e.index > index));
        if straddles {
            keys.pop();
        }
        let mut compact = sled::Batch::default();
        for k in keys {
            compact.remove(k);
        }
        // The hard state goes with the snapshot: a commit index written later
        // (by `flush`) could be lost in a crash, leaving the durable commit
        // below the snapshot, which raft-rs refuses at start.
        let mut hs = self.cache().hard.clone();
        hs.commit = hs.commit.max(index);
        self.commit_snapshot(&meta, data, &hs, None, compact)?;
        let mut cache = self.cache();
        cache.compact_to(index);
        cache.last = cache.last.max(index);
        Ok(())
    }

    /// Write a snapshot with everything that must change with it as one
    /// transaction: its bytes, its metadata, the hard state, the conf state
    /// (when given) and the log's `changes`. Updates the cached metadata and
    /// hard state; the caller updates the cached log.
    fn commit_snapshot(
        &self,
        meta: &SnapshotMetadata,
        data: &[u8],
        hs: &HardState,
        conf: Option<&ConfState>,
        changes: sled::Batch,
    ) -> Result<(), StoreError> {
        use sled::transaction::{TransactionError, Transactional};
        let corrupt = |key: &str, e: protobuf::ProtobufError| StoreError::Corrupt {
            path: self.path.clone(),
            key: key.to_string(),
            message: e.to_string(),
        };
        let data = sled::IVec::from(data);
        let meta_bytes =
            sled::IVec::from(meta.write_to_bytes().map_err(|e| corrupt(SNAP_META, e))?);
        let hs_bytes = sled::IVec::from(hs.write_to_bytes().map_err(|e| corrupt(HARD_STATE, e))?);
        let conf_bytes = conf
            .map(|c| c.write_to_bytes().map_err(|e| corrupt(CONF_STATE, e)))
            .transpose()?
            .map(sled::IVec::from);
        let result = (&self.snapshot, &self.meta, &self.db_log).transaction(|(snap, m, log)| {
            snap.insert(SNAP_DATA, data.clone())?;
            crash_point(CRASH_SNAPSHOT_DATA)?;
            m.insert(SNAP_META, meta_bytes.clone())?;
            crash_point(CRASH_SNAPSHOT_META)?;
            m.insert(HARD_STATE, hs_bytes.clone())?;
            crash_point(CRASH_SNAPSHOT_HARD_STATE)?;
            if let Some(c) = &conf_bytes {
                m.insert(CONF_STATE, c.clone())?;
            }
            log.apply_batch(&changes)?;
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Storage(source)) => {
                return Err(StoreError::Sled {
                    path: self.path.clone(),
                    source,
                })
            }
            Err(TransactionError::Abort(point)) => return Err(StoreError::Crashed(point)),
        }
        let mut c = self.cache();
        c.snap = meta.clone();
        c.hard = hs.clone();
        c.hard_unwritten = false;
        Ok(())
    }

    /// The latest snapshot's metadata and state-machine bytes, if any.
    pub fn load_snapshot(&self) -> Result<Option<(SnapshotMetadata, Vec<u8>)>, StoreError> {
        let meta = self.cache().snap.clone();
        if meta == SnapshotMetadata::default() {
            return Ok(None);
        }
        let data = self
            .sled(self.snapshot.get(SNAP_DATA))?
            .map(|v| v.to_vec())
            .unwrap_or_default();
        Ok(Some((meta, data)))
    }

    /// Append entries `low..high` as sled holds them to `out`, while they fit
    /// in `max` bytes (see [`push_limited`]). `true` when the limit stopped
    /// it; otherwise `out` got every entry sled has in the range.
    fn stored_entries(
        &self,
        low: u64,
        high: u64,
        out: &mut Vec<Entry>,
        size: &mut u64,
        max: u64,
    ) -> Result<bool, StoreError> {
        // From the record that holds `low` (the greatest key at or below it).
        let start = self
            .sled(
                self.db_log
                    .range(..=idx_key(low))
                    .keys()
                    .next_back()
                    .transpose(),
            )?
            .map_or(low, |k| key_index(&k));
        for item in self.db_log.range(idx_key(start)..idx_key(high)) {
            let (_, v) = self.sled(item)?;
            for e in self.decode_record(&v)? {
                if e.index < low || e.index >= high {
                    continue;
                }
                if !push_limited(out, size, max, e) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// Add `e` to `out` unless that takes `out` past `max` bytes; the first entry
/// always goes in (raft-rs's rule for `max_size`). `false`: it did not fit.
fn push_limited(out: &mut Vec<Entry>, size: &mut u64, max: u64, e: Entry) -> bool {
    *size += u64::from(e.compute_size());
    if !out.is_empty() && *size > max {
        return false;
    }
    out.push(e);
    true
}

/// A record: each entry as a little-endian `u32` length and its protobuf.
fn encode_record(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| e.compute_size() as usize + 4).sum());
    for e in entries {
        // Writing a protobuf into a Vec cannot fail.
        let bytes = e.write_to_bytes().unwrap_or_default();
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

fn decode_record(mut raw: &[u8]) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let (len, rest) = raw.split_first_chunk::<4>().ok_or("truncated length")?;
        let len = u32::from_le_bytes(*len) as usize;
        let body = rest.get(..len).ok_or("truncated entry")?;
        out.push(Entry::parse_from_bytes(body).map_err(|e| e.to_string())?);
        raw = &rest[len..];
    }
    Ok(out)
}

fn key_index(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[..n].copy_from_slice(&k[..n]);
    u64::from_be_bytes(b)
}

impl raft::Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.cache();
        Ok(RaftState::new(
            c.hard.clone(),
            c.conf.clone().unwrap_or_default(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max = max_size.into().unwrap_or(u64::MAX);
        let c = self.cache();
        if low < c.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > c.last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        // Older than the cache: from sled, then the rest from memory.
        let cached_from = c.recent.front().map_or(high, |e| e.index.clamp(low, high));
        let mut out = Vec::new();
        let mut size = 0u64;
        if low < cached_from {
            let full = self
                .stored_entries(low, cached_from, &mut out, &mut size, max)
                .map_err(store_err)?;
            if full {
                return Ok(out);
            }
            if out.len() as u64 != cached_from - low {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
        }
        for i in cached_from..high {
            let e = c
                .get(i)
                .cloned()
                .ok_or(raft::Error::Store(StorageError::Unavailable))?;
            if !push_limited(&mut out, &mut size, max, e) {
                break;
            }
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.cache();
        if idx == c.snap.index {
            return Ok(c.snap.term);
        }
        if idx < c.snap.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > c.last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if let Some(e) = c.get(idx) {
            return Ok(e.term);
        }
        let mut found = Vec::new();
        self.stored_entries(idx, idx + 1, &mut found, &mut 0, u64::MAX)
            .map_err(store_err)?;
        match found.first() {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.cache().first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.cache().last)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // raft-rs asks again on a later heartbeat; the driver takes a fresh
        // snapshot meanwhile. A member added after the stored snapshot is
        // not in its configuration and would refuse it (raft-rs's restore
        // drops a snapshot that does not name the recipient).
        let unavailable = || {
            self.wanted
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ))
        };
        let usable = |meta: &SnapshotMetadata| {
            let cs = meta.get_conf_state();
            let names_recipient = cs
                .voters
                .iter()
                .chain(&cs.learners)
                .chain(&cs.voters_outgoing)
                .any(|id| *id == to);
            meta.index >= request_index && names_recipient
        };
        // Judge by the metadata kept in memory first: raft-rs asks on every
        // heartbeat until a fresh snapshot exists, and reading the whole
        // snapshot from sled only to refuse it would cost megabytes a time.
        if !usable(&self.cache().snap) {
            return unavailable();
        }
        let Some((meta, data)) = self.load_snapshot().map_err(store_err)? else {
            return unavailable();
        };
        if !usable(&meta) {
            return unavailable();
        }
        let mut s = Snapshot::default();
        s.set_metadata(meta);
        s.data = data.into();
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    /// Open the database again in this process. sled's background threads
    /// can hold the previous handle's file lock for a moment after it is
    /// dropped, so a busy lock is retried for a while.
    fn reopen(dir: &Path) -> SledStorage {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStorage::open(dir) {
                Ok(s) => return s,
                Err(e)
                    if std::time::Instant::now() < deadline && e.to_string().contains("lock") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen {}: {e}", dir.display()),
            }
        }
    }

    /// What sled alone holds of `low..high`.
    fn stored(s: &SledStorage, low: u64, high: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        let limited = s
            .stored_entries(low, high, &mut out, &mut 0, u64::MAX)
            .unwrap();
        assert!(!limited);
        out
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    #[test]
    fn append_truncates_conflicting_suffix_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            assert!(s.is_empty().unwrap());
            s.bootstrap(vec![1]).unwrap();
            s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
            s.append(&[entry(2, 2)]).unwrap();
            s.set_hard_state(&HardState {
                term: 2,
                vote: 1,
                commit: 2,
                ..Default::default()
            })
            .unwrap();
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        assert_eq!(s.first_index().unwrap(), 1);
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state.commit, 2);
        assert_eq!(st.conf_state.voters, vec![1]);
        let es = s
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(es.len(), 2);
    }

    #[test]
    fn snapshot_compacts_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path()).unwrap();
        s.bootstrap(vec![1]).unwrap();
        s.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        s.save_snapshot(6, 1, &cs, b"state").unwrap();
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.term(6).unwrap(), 1);
        assert!(matches!(
            s.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snap = s.snapshot(6, 1).unwrap();
        assert_eq!(snap.get_metadata().index, 6);
        assert_eq!(&snap.data[..], b"state");
    }

    /// A member added after the stored snapshot is not in its configuration
    /// and would refuse it: raft-rs is told to ask again, and the driver is
    /// told to take a fresh one.
    #[test]
    fn a_snapshot_that_does_not_name_the_recipient_is_not_given_and_a_new_one_is_wanted() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path()).unwrap();
        assert!(matches!(
            s.snapshot(0, 1),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        assert!(s.take_snapshot_wanted(), "no snapshot at all");
        assert!(!s.take_snapshot_wanted(), "the request is cleared");
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        s.bootstrap_snapshot(&snap).unwrap();
        assert_eq!(s.snapshot(0, 1).unwrap().get_metadata().index, 1);
        assert!(!s.take_snapshot_wanted());
        assert!(matches!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        assert!(s.take_snapshot_wanted(), "member 2 is not in it");
        // The bootstrap is durable: the log starts after it.
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.first_index().unwrap(), 2);
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 1);
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1]);
    }

    #[test]
    fn the_catching_up_mark_is_durable_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            assert!(!s.catching_up().unwrap());
            s.set_catching_up(true).unwrap();
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert!(s.catching_up().unwrap());
        s.set_catching_up(false).unwrap();
        s.flush().unwrap();
        drop(s);
        assert!(!reopen(dir.path()).catching_up().unwrap());
    }

    #[test]
    fn entries_older_than_the_cache_come_from_disk_and_match_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let n = CACHE_ENTRIES as u64 + 500;
        let all: Vec<Entry> = (1..=n).map(|i| entry(i, 1 + i / 1000)).collect();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            s.bootstrap(vec![1]).unwrap();
            for chunk in all.chunks(700) {
                s.append(chunk).unwrap();
            }
            s.flush().unwrap();
            // The first 500 are no longer cached: they are read from sled.
            assert!(s.cache().get(1).is_none());
            assert_eq!(
                s.entries(1, n + 1, None, GetEntriesContext::empty(false))
                    .unwrap(),
                all
            );
            assert_eq!(s.term(3).unwrap(), 1);
            // A size limit stops the read from sled early, never below one entry.
            let one = s.entries(1, n + 1, 1, GetEntriesContext::empty(false));
            assert_eq!(one.unwrap(), all[..1]);
            let three: u64 = all[..3].iter().map(|e| u64::from(e.compute_size())).sum();
            let some = s.entries(1, n + 1, three, GetEntriesContext::empty(false));
            assert_eq!(some.unwrap(), all[..3]);
            // A conflicting suffix that starts below the cached range.
            let replacement = vec![entry(400, 9), entry(401, 9)];
            s.append(&replacement).unwrap();
            s.flush().unwrap();
            assert_eq!(s.last_index().unwrap(), 401);
            assert_eq!(s.term(401).unwrap(), 9);
            assert!(matches!(
                s.term(402),
                Err(raft::Error::Store(StorageError::Unavailable))
            ));
        }
        let s = reopen(dir.path());
        assert_eq!(s.last_index().unwrap(), 401);
        let es = s
            .entries(398, 402, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            es,
            vec![
                all[397].clone(),
                all[398].clone(),
                entry(400, 9),
                entry(401, 9)
            ]
        );
        // Appending after a reopen continues the cached run.
        s.append(&[entry(402, 9)]).unwrap();
        assert_eq!(s.term(402).unwrap(), 9);
        assert_eq!(s.cache().get(402).map(|e| e.index), Some(402));
    }

    #[test]
    fn installing_a_snapshot_drops_the_log_and_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path()).unwrap();
        s.bootstrap(vec![1]).unwrap();
        s.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.data = b"leader state".to_vec().into();
        s.apply_snapshot(&snap).unwrap();
        s.flush().unwrap();
        assert_eq!(s.first_index().unwrap(), 21);
        assert_eq!(s.last_index().unwrap(), 20);
        assert_eq!(s.term(20).unwrap(), 3);
        assert!(s.cache().recent.is_empty());
        s.append(&[entry(21, 3)]).unwrap();
        drop(s);
        let s = reopen(dir.path());
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state.commit, 20);
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(s.last_index().unwrap(), 21);
        let (meta, data) = s.load_snapshot().unwrap().unwrap();
        assert_eq!((meta.index, data), (20, b"leader state".to_vec()));
    }

    /// A one-member folder with a snapshot at index 7 (term 2) written the
    /// way older schedulers did: metadata, then `data` into `tree`.
    fn old_snapshot_at_7(s: &SledStorage, tree: &sled::Tree, data: &[u8]) {
        s.bootstrap(vec![1]).unwrap();
        let mut meta = SnapshotMetadata {
            index: 7,
            term: 2,
            ..Default::default()
        };
        meta.mut_conf_state().voters = vec![1];
        s.write(SNAP_META, &meta).unwrap();
        tree.insert(SNAP_DATA, data).unwrap();
    }

    #[test]
    fn snapshot_data_in_the_old_layout_is_moved_to_its_own_tree() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What an older scheduler wrote: the snapshot's bytes in `meta`.
            let s = SledStorage::open(dir.path()).unwrap();
            old_snapshot_at_7(&s, &s.meta, b"old");
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert!(s.meta.get(SNAP_DATA).unwrap().is_none());
        let (meta, data) = s.load_snapshot().unwrap().unwrap();
        assert_eq!((meta.index, data), (7, b"old".to_vec()));
        assert_eq!(s.first_index().unwrap(), 8);
    }

    #[test]
    fn a_log_with_one_key_per_entry_is_converted_to_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What an older scheduler wrote: tree `log`, one key per entry.
            let s = SledStorage::open(dir.path()).unwrap();
            s.bootstrap(vec![1]).unwrap();
            let old = s.db.open_tree("log").unwrap();
            for i in 1..=600 {
                old.insert(idx_key(i), entry(i, 1).write_to_bytes().unwrap())
                    .unwrap();
            }
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert!(!s.db.tree_names().iter().any(|n| &n[..] == b"log"));
        assert_eq!(s.db_log.len(), 3, "600 entries in records of 256");
        assert_eq!(s.last_index().unwrap(), 600);
        let all: Vec<Entry> = (1..=600).map(|i| entry(i, 1)).collect();
        assert_eq!(
            stored(&s, 1, 601),
            all,
            "read back from sled, not the cache"
        );
        assert_eq!(
            s.entries(1, 601, None, GetEntriesContext::empty(false))
                .unwrap(),
            all
        );
    }

    #[test]
    fn compaction_keeps_the_record_that_straddles_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path()).unwrap();
        s.bootstrap(vec![1]).unwrap();
        for lo in [1, 11, 21] {
            s.append(&(lo..lo + 10).map(|i| entry(i, 1)).collect::<Vec<_>>())
                .unwrap();
        }
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        s.save_snapshot(15, 1, &cs, b"state").unwrap();
        // Record 1..=10 is gone; 11..=20 holds 16.. and stays.
        assert_eq!(s.db_log.len(), 2);
        assert_eq!(stored(&s, 16, 31).len(), 15);
        s.save_snapshot(20, 1, &cs, b"state").unwrap();
        assert_eq!(s.db_log.len(), 1, "a record that ends at the snapshot goes");
        assert_eq!(s.term(20).unwrap(), 1);
        assert!(matches!(
            s.term(19),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
    }

    /// A log 1..=10 in records of five, commit 8, and a snapshot at 5 whose
    /// bytes name their index.
    fn crash_fixture(dir: &Path) {
        let s = SledStorage::open(dir).unwrap();
        s.bootstrap(vec![1]).unwrap();
        for lo in [1, 6] {
            s.append(&(lo..lo + 5).map(|i| entry(i, 1)).collect::<Vec<_>>())
                .unwrap();
        }
        s.set_hard_state(&HardState {
            term: 1,
            vote: 1,
            commit: 8,
            ..Default::default()
        })
        .unwrap();
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        s.save_snapshot(5, 1, &cs, b"state@5").unwrap();
        s.flush().unwrap();
    }

    /// What raft-rs and the driver need of storage at start: the snapshot's
    /// bytes are the ones its metadata names, the commit lies between the
    /// snapshot and the last entry, every entry after the snapshot reads,
    /// and raft-rs starts on it.
    fn assert_consistent(s: &SledStorage) {
        let (meta, data) = s.load_snapshot().unwrap().unwrap();
        assert_eq!(
            String::from_utf8(data).unwrap(),
            format!("state@{}", meta.index),
            "snapshot bytes do not match its metadata"
        );
        let st = s.initial_state().unwrap();
        let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
        assert_eq!(first, meta.index + 1);
        assert!(
            st.hard_state.commit >= meta.index && st.hard_state.commit <= last,
            "commit {} outside [{}, {last}]",
            st.hard_state.commit,
            meta.index
        );
        let es = s
            .entries(first, last + 1, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(es.len() as u64, last + 1 - first);
        let cfg = raft::Config {
            id: 1,
            applied: meta.index,
            ..Default::default()
        };
        let node = raft::RawNode::new(&cfg, s.clone(), &super::super::logger::logger());
        assert!(node.is_ok(), "raft-rs refuses the storage");
    }

    const CRASH_POINTS: [&str; 3] = [
        CRASH_SNAPSHOT_DATA,
        CRASH_SNAPSHOT_META,
        CRASH_SNAPSHOT_HARD_STATE,
    ];

    #[test]
    fn a_crash_while_installing_a_snapshot_leaves_the_old_storage_or_the_new() {
        for point in CRASH_POINTS {
            let dir = tempfile::tempdir().unwrap();
            crash_fixture(dir.path());
            let s = reopen(dir.path());
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 20;
            snap.mut_metadata().term = 3;
            snap.mut_metadata().mut_conf_state().voters = vec![1];
            snap.data = b"state@20".to_vec().into();
            crash::arm(point);
            assert!(
                matches!(s.apply_snapshot(&snap), Err(StoreError::Crashed(p)) if p == point),
                "{point}"
            );
            s.flush().unwrap();
            drop(s);
            let s = reopen(dir.path());
            assert_consistent(&s);
            assert_eq!(s.load_snapshot().unwrap().unwrap().0.index, 5, "{point}");
            assert_eq!(s.last_index().unwrap(), 10, "{point}");
            // The same install after the restart goes through whole.
            s.apply_snapshot(&snap).unwrap();
            s.flush().unwrap();
            drop(s);
            let s = reopen(dir.path());
            assert_consistent(&s);
            assert_eq!(s.initial_state().unwrap().hard_state.commit, 20);
            assert_eq!(s.last_index().unwrap(), 20);
        }
    }

    #[test]
    fn a_crash_while_taking_a_snapshot_leaves_the_old_storage_or_the_new() {
        for point in CRASH_POINTS {
            let dir = tempfile::tempdir().unwrap();
            crash_fixture(dir.path());
            let s = reopen(dir.path());
            let cs = ConfState {
                voters: vec![1],
                ..Default::default()
            };
            crash::arm(point);
            assert!(
                matches!(s.save_snapshot(8, 1, &cs, b"state@8"), Err(StoreError::Crashed(p)) if p == point),
                "{point}"
            );
            s.flush().unwrap();
            drop(s);
            let s = reopen(dir.path());
            assert_consistent(&s);
            assert_eq!(s.load_snapshot().unwrap().unwrap().0.index, 5, "{point}");
            s.save_snapshot(8, 1, &cs, b"state@8").unwrap();
            drop(s);
            let s = reopen(dir.path());
            assert_consistent(&s);
            assert_eq!(s.first_index().unwrap(), 9);
        }
    }

    #[test]
    fn a_snapshot_taken_before_its_commit_reached_disk_keeps_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path()).unwrap();
            s.bootstrap(vec![1]).unwrap();
            s.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>())
                .unwrap();
            s.set_hard_state(&HardState {
                term: 1,
                commit: 2,
                ..Default::default()
            })
            .unwrap();
            s.flush().unwrap();
            // Commit 9 is known in memory only (it reaches sled with the
            // next flush); the snapshot at 9 must not outrun it on disk.
            s.set_commit(9);
            let cs = ConfState {
                voters: vec![1],
                ..Default::default()
            };
            s.save_snapshot(9, 1, &cs, b"state@9").unwrap();
            s.db.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert_consistent(&s);
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 9);
    }

    #[test]
    fn an_old_data_folder_with_a_commit_below_its_snapshot_is_repaired_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What a crash between the old code's separate writes left.
            let s = SledStorage::open(dir.path()).unwrap();
            old_snapshot_at_7(&s, &s.snapshot, b"state@7");
            s.write(
                HARD_STATE,
                &HardState {
                    term: 2,
                    commit: 3,
                    ..Default::default()
                },
            )
            .unwrap();
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 7);
        assert_consistent(&s);
    }
}
