//! Durable storage: one JSON file per record under `DATA_DIR/records/`
//! (`machines/`, `executions/`, `terminals/`, `idempotency/`). A change
//! rewrites only the records it touched, each through a temporary file,
//! `fsync` and `rename`, so a crash mid-write leaves either the old or the
//! new version of a record, never a torn one. Deleting a record deletes its
//! file. A `state.json` from earlier versions is migrated on start.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::{Execution, IdemRecord, Machine, State, Terminal};

/// Which record a change touched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    Machine(String),
    Execution(String),
    Terminal(String),
    /// By idempotency key.
    Idempotency(String),
}

impl RecordKey {
    pub fn machine(id: &str) -> Self {
        Self::Machine(id.to_owned())
    }

    pub fn execution(id: &str) -> Self {
        Self::Execution(id.to_owned())
    }

    pub fn terminal(id: &str) -> Self {
        Self::Terminal(id.to_owned())
    }

    pub fn idempotency(key: &str) -> Self {
        Self::Idempotency(key.to_owned())
    }

    /// The record's file, relative to the records directory. Ids are ours
    /// (`dm-…`, `ex-…`, UUIDs); idempotency keys are the client's, so their
    /// files are named by a hash.
    fn relative_path(&self) -> PathBuf {
        match self {
            Self::Machine(id) => Path::new(MACHINES).join(file_name(id)),
            Self::Execution(id) => Path::new(EXECUTIONS).join(file_name(id)),
            Self::Terminal(id) => Path::new(TERMINALS).join(file_name(id)),
            Self::Idempotency(key) => {
                let hash: String = Sha256::digest(key.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                Path::new(IDEMPOTENCY).join(format!("{hash}.json"))
            }
        }
    }
}

const MACHINES: &str = "machines";
const EXECUTIONS: &str = "executions";
const TERMINALS: &str = "terminals";
const IDEMPOTENCY: &str = "idempotency";
const KINDS: [&str; 4] = [MACHINES, EXECUTIONS, TERMINALS, IDEMPOTENCY];

/// A file name for a server-made id (anything but `[A-Za-z0-9_-]` becomes `_`).
fn file_name(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.json")
}

/// An idempotency record with its key (the file name is only a hash).
#[derive(Serialize, Deserialize)]
struct IdemFile {
    key: String,
    #[serde(flatten)]
    record: IdemRecord,
}

/// What to do with one record's file.
pub enum Write1 {
    /// Write these bytes.
    Put(RecordKey, Vec<u8>),
    /// Remove the file.
    Delete(RecordKey),
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot serialise a record: {0}")]
    Serialise(#[from] serde_json::Error),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// `DATA_DIR/records`.
pub fn records_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("records")
}

/// The snapshot of one record, ready to be written off the state lock.
pub enum Snapshot {
    Machine(Machine),
    Execution(Box<Execution>),
    Terminal(Terminal),
    Idempotency(String, IdemRecord),
    Gone(RecordKey),
}

impl Snapshot {
    /// The record `key` as it is in `state` now (`Gone` when removed).
    pub fn take(state: &State, key: &RecordKey) -> Self {
        let gone = || Self::Gone(key.clone());
        match key {
            RecordKey::Machine(id) => state
                .machines
                .get(id)
                .map_or_else(gone, |m| Self::Machine(m.clone())),
            RecordKey::Execution(id) => state
                .executions
                .get(id)
                .map_or_else(gone, |e| Self::Execution(Box::new(e.clone()))),
            RecordKey::Terminal(id) => state
                .terminals
                .get(id)
                .map_or_else(gone, |t| Self::Terminal(t.clone())),
            RecordKey::Idempotency(k) => state
                .idempotency
                .get(k)
                .map_or_else(gone, |r| Self::Idempotency(k.clone(), r.clone())),
        }
    }

    /// Serialises the snapshot into a file operation.
    pub fn encode(self) -> Result<Write1, StoreError> {
        Ok(match self {
            Self::Machine(m) => Write1::Put(RecordKey::machine(&m.id), serde_json::to_vec(&m)?),
            Self::Execution(e) => Write1::Put(RecordKey::execution(&e.id), serde_json::to_vec(&e)?),
            Self::Terminal(t) => Write1::Put(RecordKey::terminal(&t.id), serde_json::to_vec(&t)?),
            Self::Idempotency(key, record) => {
                let rk = RecordKey::Idempotency(key.clone());
                Write1::Put(rk, serde_json::to_vec(&IdemFile { key, record })?)
            }
            Self::Gone(key) => Write1::Delete(key),
        })
    }
}

/// Most files written (and fsynced) in parallel by one batch.
const WRITERS: usize = 8;

/// Writes `ops` (each atomically: temporary file, fsync, rename; deletes
/// remove the file). The files of one batch are written in parallel, so
/// their fsyncs share the file system's journal commits. Returns the keys
/// whose write failed, with the first error.
pub fn write_batch(root: &Path, ops: Vec<Write1>) -> Result<(), (Vec<RecordKey>, StoreError)> {
    let mut puts = Vec::new();
    let mut results = Vec::new();
    for op in ops {
        match op {
            Write1::Put(key, bytes) => puts.push((key, bytes)),
            Write1::Delete(key) => {
                let r = delete(root, &key);
                results.push((key, r));
            }
        }
    }
    if puts.len() <= 1 {
        for (key, bytes) in puts {
            let r = put(root, &key, &bytes);
            results.push((key, r));
        }
    } else {
        let per_writer = puts.len().div_ceil(WRITERS);
        std::thread::scope(|scope| {
            let handles: Vec<_> = puts
                .chunks(per_writer)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|(key, bytes)| (key.clone(), put(root, key, bytes)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in handles {
                match h.join() {
                    Ok(r) => results.extend(r),
                    Err(_) => tracing::error!("a record writer thread panicked"),
                }
            }
        });
    }
    let mut failed = Vec::new();
    let mut first_error = None;
    for (key, r) in results {
        if let Err(e) = r {
            failed.push(key);
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err((failed, e)),
    }
}

/// The data is fsynced before the rename, so even after a power loss the
/// file holds the old or the new record; the directory is not fsynced (as
/// before: a power loss may lose the newest changes, never corrupt one).
fn put(root: &Path, key: &RecordKey, bytes: &[u8]) -> Result<(), StoreError> {
    let path = root.join(key.relative_path());
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()
    };
    write().map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename", &path))
}

fn delete(root: &Path, key: &RecordKey) -> Result<(), StoreError> {
    let path = root.join(key.relative_path());
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", &path)(e)),
    }
}

/// Creates the record directories.
pub fn create_dirs(data_dir: &Path) -> Result<(), StoreError> {
    let root = records_dir(data_dir);
    for kind in KINDS {
        let dir = root.join(kind);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    }
    Ok(())
}

/// Every record file of one kind, parsed. Leftover temporary files (a crash
/// between write and rename) are removed; they never replaced a record.
fn read_kind<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_err("list", dir))?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => {
                let bytes = fs::read(&path).map_err(io_err("read", &path))?;
                let value = serde_json::from_slice(&bytes)
                    .map_err(|source| StoreError::Parse { path, source })?;
                out.push(value);
            }
            Some("tmp") => {
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover temporary file");
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Loads every record under `DATA_DIR/records` (an empty state if none).
pub fn load(data_dir: &Path) -> Result<State, StoreError> {
    let root = records_dir(data_dir);
    let mut state = State::default();
    for m in read_kind::<Machine>(&root.join(MACHINES))? {
        state.insert_machine(m);
    }
    for t in read_kind::<Terminal>(&root.join(TERMINALS))? {
        state.insert_terminal(t);
    }
    for e in read_kind::<Execution>(&root.join(EXECUTIONS))? {
        state.insert_execution(e);
    }
    for f in read_kind::<IdemFile>(&root.join(IDEMPOTENCY))? {
        state.insert_idempotency(f.key, f.record);
    }
    state.take_dirty();
    Ok(state)
}

/// `DATA_DIR/state.json`, the single file of earlier versions.
fn legacy_path(data_dir: &Path) -> PathBuf {
    data_dir.join("state.json")
}

/// Reads an earlier version's `state.json`, if there is one. Its records
/// come back marked dirty, so the next flush writes them as record files;
/// then [`retire_legacy`] moves the old file aside.
pub fn load_legacy(data_dir: &Path) -> Result<Option<State>, StoreError> {
    #[derive(Deserialize)]
    struct Legacy {
        #[serde(default)]
        machines: std::collections::BTreeMap<String, Machine>,
        #[serde(default)]
        executions: std::collections::BTreeMap<String, Execution>,
        #[serde(default)]
        terminals: std::collections::BTreeMap<String, Terminal>,
        #[serde(default)]
        idempotency: std::collections::BTreeMap<String, IdemRecord>,
    }
    let path = legacy_path(data_dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let legacy: Legacy =
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse { path, source })?;
    let mut state = State::default();
    for m in legacy.machines.into_values() {
        state.insert_machine(m);
    }
    for t in legacy.terminals.into_values() {
        state.insert_terminal(t);
    }
    for mut e in legacy.executions.into_values() {
        e.drop_legacy_output_events();
        state.insert_execution(e);
    }
    for (key, record) in legacy.idempotency {
        state.insert_idempotency(key, record);
    }
    Ok(Some(state))
}

/// Renames a migrated `state.json` to `state.json.migrated`.
pub fn retire_legacy(data_dir: &Path) -> Result<(), StoreError> {
    let path = legacy_path(data_dir);
    fs::rename(&path, data_dir.join("state.json.migrated")).map_err(io_err("rename", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_files_are_named_by_hash() {
        let p = RecordKey::idempotency("../../etc/passwd").relative_path();
        assert!(p.starts_with(IDEMPOTENCY));
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert_eq!(name.len(), 64 + ".json".len(), "{name}");
        assert!(!name.contains('/'));
        assert_eq!(
            RecordKey::execution("ex-1/..").relative_path(),
            Path::new(EXECUTIONS).join("ex-1___.json")
        );
    }
}
