//! `raft::Storage` on sled: the log, hard state, conf state and the latest
//! snapshot, in one sled database inside the scheduler's data folder.
//!
//! Layout: tree `log` maps a big-endian index to a protobuf `Entry`; tree
//! `meta` holds `hard_state`, `conf_state`, `snap_meta` (index and term of the
//! latest snapshot) and `snap_data` (the serialized state machine). Writes of
//! one `Ready` go in with [`SledStorage::append`] and friends and become
//! durable together with one [`SledStorage::flush`].

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::path::{Path, PathBuf};

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
}

/// Raft storage in sled. Cheap to clone (sled trees are handles).
#[derive(Clone)]
pub struct SledStorage {
    path: PathBuf,
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAP_META: &str = "snap_meta";
const SNAP_DATA: &str = "snap_data";

fn idx_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn store_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
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
        let log = db.open_tree("log").map_err(wrap)?;
        let meta = db.open_tree("meta").map_err(wrap)?;
        Ok(SledStorage {
            path,
            db,
            log,
            meta,
        })
    }

    /// Whether nothing was ever stored (a brand-new node).
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.read::<ConfState>(CONF_STATE)?.is_none())
    }

    /// Set the conf state of a brand-new node (its first members).
    pub fn bootstrap(&self, voters: Vec<u64>) -> Result<(), StoreError> {
        let cs = ConfState {
            voters,
            ..Default::default()
        };
        self.write(CONF_STATE, &cs)?;
        self.flush()
    }

    fn read<M: protobuf::Message>(&self, key: &str) -> Result<Option<M>, StoreError> {
        let raw = self.meta.get(key).map_err(|source| StoreError::Sled {
            path: self.path.clone(),
            source,
        })?;
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
        self.meta
            .insert(key, bytes)
            .map_err(|source| StoreError::Sled {
                path: self.path.clone(),
                source,
            })?;
        Ok(())
    }

    fn sled<T>(&self, r: Result<T, sled::Error>) -> Result<T, StoreError> {
        r.map_err(|source| StoreError::Sled {
            path: self.path.clone(),
            source,
        })
    }

    /// Make everything written so far durable (one fsync per `Ready`).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.sled(self.db.flush().map(|_| ()))
    }

    /// Append entries, dropping any conflicting suffix of the log.
    pub fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let last = self.last_index_inner()?;
        let mut batch = sled::Batch::default();
        for i in first.index..=last {
            batch.remove(&idx_key(i));
        }
        for e in entries {
            let bytes = e.write_to_bytes().map_err(|err| StoreError::Corrupt {
                path: self.path.clone(),
                key: format!("log/{}", e.index),
                message: err.to_string(),
            })?;
            batch.insert(&idx_key(e.index), bytes);
        }
        self.sled(self.log.apply_batch(batch))
    }

    /// Persist the hard state.
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StoreError> {
        self.write(HARD_STATE, hs)
    }

    /// Persist the commit index only.
    pub fn set_commit(&self, commit: u64) -> Result<(), StoreError> {
        let mut hs: HardState = self.read(HARD_STATE)?.unwrap_or_default();
        hs.commit = commit;
        self.write(HARD_STATE, &hs)
    }

    /// Persist the conf state (after a membership change is applied).
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StoreError> {
        self.write(CONF_STATE, cs)
    }

    /// Install a snapshot received from the leader: the log before it is gone.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        self.save_snapshot(meta.index, meta.term, meta.get_conf_state(), &snap.data)?;
        let mut hs: HardState = self.read(HARD_STATE)?.unwrap_or_default();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        self.write(HARD_STATE, &hs)?;
        self.write(CONF_STATE, meta.get_conf_state())?;
        // Entries after the snapshot may conflict with the leader's; drop all.
        self.sled(self.log.clear())
    }

    /// Record a snapshot of our own state machine at `index` and compact the
    /// log up to it.
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
        self.write(SNAP_META, &meta)?;
        self.sled(self.meta.insert(SNAP_DATA, data))?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=idx_key(index).to_vec()).keys() {
            batch.remove(self.sled(item)?);
        }
        self.sled(self.log.apply_batch(batch))
    }

    /// The latest snapshot's metadata and state-machine bytes, if any.
    pub fn load_snapshot(&self) -> Result<Option<(SnapshotMetadata, Vec<u8>)>, StoreError> {
        let Some(meta) = self.read::<SnapshotMetadata>(SNAP_META)? else {
            return Ok(None);
        };
        let data = self
            .sled(self.meta.get(SNAP_DATA))?
            .map(|v| v.to_vec())
            .unwrap_or_default();
        Ok(Some((meta, data)))
    }

    fn snap_meta(&self) -> Result<SnapshotMetadata, StoreError> {
        Ok(self.read(SNAP_META)?.unwrap_or_default())
    }

    fn last_index_inner(&self) -> Result<u64, StoreError> {
        match self.sled(self.log.last())? {
            Some((k, _)) => Ok(key_index(&k)),
            None => Ok(self.snap_meta()?.index),
        }
    }

    fn entry(&self, idx: u64) -> Result<Option<Entry>, StoreError> {
        let Some(raw) = self.sled(self.log.get(idx_key(idx)))? else {
            return Ok(None);
        };
        Entry::parse_from_bytes(&raw)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                key: format!("log/{idx}"),
                message: e.to_string(),
            })
    }
}

fn key_index(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[..n].copy_from_slice(&k[..n]);
    u64::from_be_bytes(b)
}

impl raft::Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let hs: HardState = self
            .read(HARD_STATE)
            .map_err(store_err)?
            .unwrap_or_default();
        let cs: ConfState = self
            .read(CONF_STATE)
            .map_err(store_err)?
            .unwrap_or_default();
        Ok(RaftState::new(hs, cs))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.snap_meta().map_err(store_err)?.index + 1;
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut size = 0u64;
        for i in low..high {
            let e = self
                .entry(i)
                .map_err(store_err)?
                .ok_or(raft::Error::Store(StorageError::Unavailable))?;
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snap_meta().map_err(store_err)?;
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < snap.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entry(idx).map_err(store_err)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snap_meta().map_err(store_err)?.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.last_index_inner().map_err(store_err)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let Some((meta, data)) = self.load_snapshot().map_err(store_err)? else {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        };
        if meta.index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
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
        let s = SledStorage::open(dir.path()).unwrap();
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
        let snap = s.snapshot(6, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 6);
        assert_eq!(&snap.data[..], b"state");
    }
}
