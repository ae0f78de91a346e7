//! The `/files` store: the snapshots and persistent data Croquet clients upload (opaque,
//! encrypted by them) and fetch back, on disk under a data directory.
//!
//! Layout under the store's directory:
//! - `files/<path>`: what `PUT /files/<path>` uploaded, served back by `GET /files/<path>`.
//!   Clients use `apps/<appId>/snap/<codeHash>/<persistentId>.<sessionId>/<time>_<seq>.<hash>`
//!   for snapshots and `apps/<appId>/<persistentId>/save/<hash>` for persistent data.
//! - `saved/<appId>/<persistentId>.json`: `{"url": ...}`, the newest persistent data SAVE
//!   recorded for an app, which the next session of that app starts from.
//!
//! Paths are checked before anything touches the disk: relative, at most
//! [`MAX_PATH_SEGMENTS`] plain names of letters, digits, `.`, `_`, `-`, `%` (no `..`, no empty
//! names, no leading dot), and no existing component may be a symlink, so nothing can reach
//! outside the directory. Files are written to a temporary name and renamed. Sizes are bounded
//! per file and in total ([`StoreConfig`]). Snapshots are cleaned up: when a newer snapshot
//! serves a session only the newest [`KEEP_SNAPSHOTS`] of its directory stay, and when a
//! session ends all of its snapshots go. The newest [`KEEP_SNAPSHOTS`] saves of an app stay.

use crate::CroquetError;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Largest file a client may upload (64 MiB, the session core's snapshot limit too).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes the store may hold in all (4 GiB).
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Names in a file path at most.
pub const MAX_PATH_SEGMENTS: usize = 12;
/// Bytes of a file path at most.
pub const MAX_PATH_BYTES: usize = 1024;
/// Snapshots kept per session directory (and saves per app): the newest serves joiners, the
/// one before it may still be downloading by a joiner that was sent it a moment ago.
pub const KEEP_SNAPSHOTS: usize = 2;

/// Where the store lives and how much it may hold.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The data directory (`files/` and `saved/` are made inside it).
    pub dir: PathBuf,
    /// Largest file.
    pub max_file_bytes: u64,
    /// Largest total.
    pub max_total_bytes: u64,
}

impl StoreConfig {
    /// The defaults under `dir`.
    pub fn new(dir: PathBuf) -> Self {
        StoreConfig {
            dir,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
        }
    }
}

/// The file store. Its methods block on the disk: call them off the async runtime.
#[derive(Debug)]
pub struct FileStore {
    cfg: StoreConfig,
    used: Mutex<u64>,
}

fn io(path: &Path, source: std::io::Error) -> CroquetError {
    CroquetError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Whether one path name is plain: no separators, dots only inside, a safe alphabet.
pub fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'%'))
}

/// Checks a relative file path and splits it into names.
pub fn check_path(path: &str) -> Result<Vec<&str>, CroquetError> {
    let bad = || CroquetError::BadPath(path.chars().take(200).collect());
    if path.is_empty() || path.len() > MAX_PATH_BYTES {
        return Err(bad());
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > MAX_PATH_SEGMENTS || !parts.iter().all(|p| plain_name(p)) {
        return Err(bad());
    }
    Ok(parts)
}

impl FileStore {
    /// Opens (creating) the store and counts what it holds.
    pub fn open(cfg: StoreConfig) -> Result<FileStore, CroquetError> {
        for sub in ["files", "saved"] {
            let d = cfg.dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
            // Directories left by another user exist but may refuse us: find out now, not at
            // the first upload.
            let probe = d.join(format!(".write-probe-{}", std::process::id()));
            fs::write(&probe, b"").map_err(|e| io(&d, e))?;
            let _ = fs::remove_file(&probe);
        }
        let used = dir_size(&cfg.dir.join("files"));
        Ok(FileStore {
            cfg,
            used: Mutex::new(used),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Bytes stored under `files/`.
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The on-disk path of a checked relative path, making sure no existing component on the
    /// way is a symlink (which could point outside the store).
    fn resolve(&self, root: &str, parts: &[&str]) -> Result<PathBuf, CroquetError> {
        let mut p = self.cfg.dir.join(root);
        for part in parts {
            p.push(part);
            if let Ok(meta) = fs::symlink_metadata(&p) {
                if meta.file_type().is_symlink() {
                    return Err(CroquetError::BadPath(format!(
                        "{} is a symlink",
                        p.display()
                    )));
                }
            }
        }
        Ok(p)
    }

    /// Stores `data` at `path` (replacing what was there).
    pub fn put(&self, path: &str, data: &[u8]) -> Result<(), CroquetError> {
        let parts = check_path(path)?;
        let size = data.len() as u64;
        if size > self.cfg.max_file_bytes {
            return Err(CroquetError::TooLarge {
                size,
                limit: self.cfg.max_file_bytes,
            });
        }
        let target = self.resolve("files", &parts)?;
        let old = fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
        {
            // Reserve the bytes under the lock, so uploads running at once cannot all pass
            // the check and together overshoot the store's bound.
            let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
            if *used - old.min(*used) + size > self.cfg.max_total_bytes {
                return Err(CroquetError::StoreFull {
                    used: *used,
                    limit: self.cfg.max_total_bytes,
                });
            }
            *used += size;
        }
        let written = target
            .parent()
            .map_or(Ok(()), |parent| {
                fs::create_dir_all(parent).map_err(|e| io(parent, e))
            })
            .and_then(|()| write_atomically(&target, data));
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        match written {
            Ok(()) => {
                *used = used.saturating_sub(old);
                Ok(())
            }
            Err(e) => {
                *used = used.saturating_sub(size);
                Err(e)
            }
        }
    }

    /// The size of the file stored at `path` (to budget memory before reading it).
    pub fn len(&self, path: &str) -> Result<u64, CroquetError> {
        let parts = check_path(path)?;
        let target = self.resolve("files", &parts)?;
        match fs::metadata(&target) {
            Ok(m) if m.is_file() => Ok(m.len()),
            Ok(_) => Err(CroquetError::NotFound(path.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(CroquetError::NotFound(path.to_string()))
            }
            Err(e) => Err(io(&target, e)),
        }
    }

    /// The bytes stored at `path`.
    pub fn get(&self, path: &str) -> Result<Vec<u8>, CroquetError> {
        let parts = check_path(path)?;
        let target = self.resolve("files", &parts)?;
        match fs::read(&target) {
            Ok(data) => Ok(data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(CroquetError::NotFound(path.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
                Err(CroquetError::NotFound(path.to_string()))
            }
            Err(e) => Err(io(&target, e)),
        }
    }

    /// Records `url` as the persistent data of `app_id` / `persistent_id` and drops all but the
    /// newest [`KEEP_SNAPSHOTS`] saves of that app in this store.
    pub fn save(&self, app_id: &str, persistent_id: &str, url: &str) -> Result<(), CroquetError> {
        if !plain_name(app_id) || !plain_name(persistent_id) {
            return Err(CroquetError::BadPath(format!("{app_id}/{persistent_id}")));
        }
        let target = self.resolve("saved", &[app_id, &format!("{persistent_id}.json")])?;
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let body = serde_json::json!({ "url": url }).to_string();
        write_atomically(&target, body.as_bytes())?;
        if let Ok(dir) = self.resolve("files", &["apps", app_id, persistent_id, "save"]) {
            self.keep_newest(&dir, None);
        }
        Ok(())
    }

    /// The persistent data URL saved for `app_id` / `persistent_id`.
    pub fn saved(&self, app_id: &str, persistent_id: &str) -> Option<String> {
        if !plain_name(app_id) || !plain_name(persistent_id) {
            return None;
        }
        let target = self
            .resolve("saved", &[app_id, &format!("{persistent_id}.json")])
            .ok()?;
        let text = fs::read(target).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        v.get("url")?.as_str().map(str::to_string)
    }

    /// A snapshot at `path` now serves session `session`: older snapshots in its directory are
    /// removed, all but the newest [`KEEP_SNAPSHOTS`] (names start with the padded time).
    /// Only the session's own snapshot directory is touched (`apps/*/snap/*/<pid>.<session>/`
    /// or `snapshots/<session>/`, where the clients put them): the URL comes from a client's
    /// SNAP, and must not let it prune another session's snapshots or an app's saves.
    pub fn snapshot_stored(&self, session: &str, path: &str) {
        let Ok(parts) = check_path(path) else {
            return;
        };
        let suffix = format!(".{session}");
        let own = match parts.as_slice() {
            ["apps", _, "snap", _, dir, _] => dir.ends_with(&suffix),
            ["snapshots", dir, _] => *dir == session,
            _ => false,
        };
        if !own {
            return;
        }
        let Ok(file) = self.resolve("files", &parts) else {
            return;
        };
        if let Some(dir) = file.parent() {
            self.keep_newest(dir, file.file_name().and_then(|n| n.to_str()));
        }
    }

    /// A session ended: its snapshot directories (named `*.<session>` under
    /// `apps/*/snap/*/`, or `snapshots/<session>`) are removed.
    pub fn session_ended(&self, session: &str) {
        if !plain_name(session) {
            return;
        }
        let files = self.cfg.dir.join("files");
        let mut dirs = Vec::new();
        if let Ok(p) = self.resolve("files", &["snapshots", session]) {
            dirs.push(p);
        }
        let suffix = format!(".{session}");
        for app in read_dirs(&files.join("apps")) {
            for code in read_dirs(&app.join("snap")) {
                for d in read_dirs(&code) {
                    if d.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(&suffix))
                    {
                        dirs.push(d);
                    }
                }
            }
        }
        for d in dirs {
            let size = dir_size(&d);
            if fs::remove_dir_all(&d).is_ok() {
                let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
                *used = used.saturating_sub(size);
            }
        }
    }

    /// Removes all but the newest [`KEEP_SNAPSHOTS`] plain files of `dir` (by name, or by
    /// modification time when `newest` is not given), never `newest` itself.
    fn keep_newest(&self, dir: &Path, newest: Option<&str>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut files: Vec<(String, std::time::SystemTime, u64)> = entries
            .flatten()
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                if !meta.is_file() {
                    return None;
                }
                let name = e.file_name().into_string().ok()?;
                Some((name, meta.modified().ok()?, meta.len()))
            })
            .collect();
        if newest.is_some() {
            files.sort_by(|a, b| b.0.cmp(&a.0));
        } else {
            files.sort_by_key(|f| std::cmp::Reverse(f.1));
        }
        for (name, _, len) in files.into_iter().skip(KEEP_SNAPSHOTS) {
            if Some(name.as_str()) == newest {
                continue;
            }
            if fs::remove_file(dir.join(&name)).is_ok() {
                let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
                *used = used.saturating_sub(len);
            }
        }
    }
}

fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn write_atomically(target: &Path, data: &[u8]) -> Result<(), CroquetError> {
    let mut tmp = target.as_os_str().to_owned();
    // Unique per write: two uploads to the same path at once must not share (and mix) one
    // temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tmp.push(format!(".tmp{}-{n}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        fs::rename(&tmp, target)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(target, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(limit: u64) -> (FileStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "isthmus-store-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        let mut cfg = StoreConfig::new(dir.clone());
        cfg.max_total_bytes = limit;
        cfg.max_file_bytes = 100;
        (FileStore::open(cfg).expect("open"), dir)
    }

    #[test]
    fn paths_that_could_escape_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/./b",
            ".hidden",
            "a/b\\c",
            "a b",
            "a/\0",
            "a/",
            "/a",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        let deep = vec!["a"; MAX_PATH_SEGMENTS + 1].join("/");
        assert!(check_path(&deep).is_err());
        assert!(check_path("apps/io.croquet.x/snap/abc/p.sid/0000000012_3.h-_x%20").is_ok());
    }

    #[test]
    fn put_get_limits_and_symlinks() {
        let (store, dir) = temp_store(150);
        store.put("a/b/c", b"hello").expect("put");
        assert_eq!(store.get("a/b/c").expect("get"), b"hello");
        assert!(matches!(store.get("a/b/d"), Err(CroquetError::NotFound(_))));
        assert!(matches!(store.get("a/b"), Err(CroquetError::NotFound(_))));
        assert!(matches!(
            store.put("big", &[0; 101]),
            Err(CroquetError::TooLarge { .. })
        ));
        store.put("x", &[0; 100]).expect("fits");
        assert!(matches!(
            store.put("y", &[0; 60]),
            Err(CroquetError::StoreFull { .. })
        ));
        assert_eq!(store.used(), 105);
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/tmp", dir.join("files/link")).expect("symlink");
            assert!(matches!(
                store.put("link/z", b"1"),
                Err(CroquetError::BadPath(_))
            ));
            assert!(matches!(store.get("link/z"), Err(CroquetError::BadPath(_))));
        }
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn uploads_at_once_stay_within_the_store_bound_and_failed_ones_are_not_counted() {
        let (store, dir) = temp_store(250);
        let store = std::sync::Arc::new(store);
        let ok: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = store.clone();
                    s.spawn(move || store.put(&format!("f{i}"), &[0; 100]).is_ok())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().expect("thread")))
                .sum()
        });
        assert_eq!(ok, 2);
        assert_eq!(store.used(), 200);
        // A write that fails (the target is a directory) gives its reservation back.
        store.put("d/x", b"1").expect("put");
        assert!(store.put("d", b"2").is_err());
        assert_eq!(store.used(), 201);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn snapshots_are_cleaned_up_and_saves_remembered() {
        let (store, dir) = temp_store(10_000);
        let d = "apps/app/snap/code/pid.sess1";
        for t in 1..=4 {
            store
                .put(&format!("{d}/000000000{t}_{t}.h"), b"s")
                .expect("put");
        }
        store
            .put("apps/app/snap/code/pid.sess2/0000000001_1.h", b"s")
            .expect("put");
        for t in 1..=3 {
            store
                .put(&format!("apps/other/pid/save/000000000{t}"), b"p")
                .expect("put");
        }
        // A SNAP URL in another session's or an app's save directory prunes nothing.
        store.snapshot_stored("sess2", &format!("{d}/0000000009_9.h"));
        store.snapshot_stored("sess1", "apps/other/pid/save/0000000009");
        store.snapshot_stored("sess1", "apps/app/snap/code/pid.sess2/0000000009_9.h");
        for t in 1..=3 {
            assert!(store.get(&format!("{d}/000000000{t}_{t}.h")).is_ok());
            assert!(store
                .get(&format!("apps/other/pid/save/000000000{t}"))
                .is_ok());
        }
        store.snapshot_stored("sess1", &format!("{d}/0000000004_4.h"));
        assert!(store.get(&format!("{d}/0000000004_4.h")).is_ok());
        assert!(store.get(&format!("{d}/0000000003_3.h")).is_ok());
        assert!(store.get(&format!("{d}/0000000002_2.h")).is_err());
        store.session_ended("sess1");
        assert!(store.get(&format!("{d}/0000000004_4.h")).is_err());
        assert!(store
            .get("apps/app/snap/code/pid.sess2/0000000001_1.h")
            .is_ok());
        assert_eq!(store.used(), 1 + 3);
        assert_eq!(store.saved("app", "pid"), None);
        store
            .save("app", "pid", "http://h/files/apps/app/pid/save/x")
            .expect("save");
        assert_eq!(
            store.saved("app", "pid").as_deref(),
            Some("http://h/files/apps/app/pid/save/x")
        );
        assert!(store.save("../app", "pid", "u").is_err());
        let _ = fs::remove_dir_all(dir);
    }
}
