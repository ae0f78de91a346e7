//! The islands this router is home for, kept in a small file in its data directory, so that
//! after a crash and restart it accepts their replicas' recovering hellos from anywhere the
//! island could be joined, even where its create policy (`lan` by default) would refuse a new
//! island: a host's replicas on the Internet re-create their island as its LAN replicas do.
//!
//! What is kept is public: the session id, the island's three public keys and how it was
//! created (tick interval, membership announcements, its beacon name and destination). Never a
//! secret: a LAN-open island's participant secret is left out (a creator on the LAN brings it
//! again in its recovering hello). The file is rewritten whole, atomically (a temporary file
//! renamed over it), at most every [`WRITE_EVERY`]; islands created in the last moment before a
//! crash may be missing from it, and then fall back to the create policy.

use isthmus_router::auth::IslandKeys;
use isthmus_router::ids::SessionId;
use isthmus_router::wire::{Announce, CreateOptions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Islands remembered at most (live ones and those of the previous run awaiting their
/// replicas); past it the file keeps the newest.
pub const MAX_REMEMBERED_ISLANDS: usize = 10_000;
/// How long islands of the previous run are remembered after a restart: their replicas come
/// back within seconds, and give up after five minutes by default.
pub const REMEMBER_PREVIOUS_FOR: Duration = Duration::from_secs(600);
/// The file is rewritten at most this often.
pub const WRITE_EVERY: Duration = Duration::from_millis(500);
/// A larger file is not read (it cannot be ours).
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// One island, as the file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// The session id (the hash of the keys).
    pub session: SessionId,
    /// Its public keys.
    pub keys: IslandKeys,
    /// Its tick interval, if the creator chose one.
    pub tick_interval_ms: Option<u32>,
    /// Joins and leaves are stamped into the order.
    pub announce_membership: bool,
    /// Its beacon name, if it is listed on the LAN (always as private here).
    pub name: Option<String>,
    /// Where in the island to arrive, with the name.
    pub destination: Option<uuid::Uuid>,
}

impl Remembered {
    /// What is kept of an island created with `opts`: no secret.
    pub fn of(session: SessionId, keys: IslandKeys, opts: &CreateOptions) -> Remembered {
        Remembered {
            session,
            keys,
            tick_interval_ms: opts.tick_interval_ms,
            announce_membership: opts.announce_membership,
            name: opts.announce.as_ref().map(|a| a.name.clone()),
            destination: opts.announce.as_ref().and_then(|a| a.destination),
        }
    }

    /// The options to re-create it with (listed as private if it was listed at all).
    pub fn options(&self) -> CreateOptions {
        CreateOptions {
            tick_interval_ms: self.tick_interval_ms,
            announce_membership: self.announce_membership,
            announce: self.name.clone().map(|name| Announce {
                name,
                destination: self.destination,
                secret: None,
            }),
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    islands: Vec<Remembered>,
}

struct Inner {
    /// Islands alive here now.
    live: BTreeMap<SessionId, Remembered>,
    /// Islands of the previous run not re-created yet.
    previous: BTreeMap<SessionId, Remembered>,
    dirty: bool,
}

/// The remembered islands and their file.
pub struct Book {
    path: Option<PathBuf>,
    started: Instant,
    inner: Mutex<Inner>,
    wake: Notify,
}

impl Book {
    /// Reads `path` if there is one (a missing or unreadable file is an empty book, with a
    /// warning for the unreadable); `None` remembers nothing beyond this process.
    pub fn open(path: Option<PathBuf>) -> Book {
        let previous = path.as_deref().map(read).unwrap_or_default();
        if !previous.is_empty() {
            info!(
                islands = previous.len(),
                "remembered islands of the previous run; their replicas may re-create them"
            );
        }
        Book {
            path,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                live: BTreeMap::new(),
                previous: previous.into_iter().map(|r| (r.session, r)).collect(),
                dirty: false,
            }),
            wake: Notify::new(),
        }
    }

    /// The island `session` with `keys`, if this router was its home before a restart (or is
    /// now).
    pub fn lookup(&self, session: SessionId, keys: &IslandKeys) -> Option<Remembered> {
        let inner = self.inner.lock().ok()?;
        let fresh = self.started.elapsed() < REMEMBER_PREVIOUS_FOR;
        inner
            .live
            .get(&session)
            .or(inner.previous.get(&session).filter(|_| fresh))
            .filter(|r| r.keys == *keys)
            .cloned()
    }

    /// An island is alive here.
    pub fn insert(&self, r: Remembered) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.previous.remove(&r.session);
            if inner.live.len() < MAX_REMEMBERED_ISLANDS {
                inner.live.insert(r.session, r);
            }
            inner.dirty = true;
        }
        self.wake.notify_one();
    }

    /// An island ended here (lingered out, or closed by its admin).
    pub fn remove(&self, session: SessionId) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.dirty |= inner.live.remove(&session).is_some();
        }
        self.wake.notify_one();
    }

    /// Writes the file whenever the book changed, at most every [`WRITE_EVERY`], until
    /// `shutdown`, then once more if needed.
    pub async fn run(&self, shutdown: CancellationToken) {
        let Some(path) = self.path.clone() else {
            return;
        };
        loop {
            let stopping = tokio::select! {
                _ = self.wake.notified() => false,
                _ = shutdown.cancelled() => true,
            };
            if let Some(file) = self.take_dirty() {
                let p = path.clone();
                match tokio::task::spawn_blocking(move || write(&p, &file)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(
                        "cannot write the remembered islands to {}: {e}; after a restart, replicas from outside the create policy cannot re-create their islands",
                        path.display()
                    ),
                    Err(_) => {}
                }
            }
            if stopping {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(WRITE_EVERY) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    fn take_dirty(&self) -> Option<File> {
        let mut inner = self.inner.lock().ok()?;
        if !std::mem::take(&mut inner.dirty) {
            return None;
        }
        let fresh = self.started.elapsed() < REMEMBER_PREVIOUS_FOR;
        if !fresh {
            inner.previous.clear();
        }
        let islands = inner
            .live
            .values()
            .chain(inner.previous.values())
            .take(MAX_REMEMBERED_ISLANDS)
            .cloned()
            .collect();
        Some(File { islands })
    }
}

fn read(path: &Path) -> Vec<Remembered> {
    let text = match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            warn!(
                "{} is larger than {MAX_FILE_BYTES} bytes; not reading it as remembered islands",
                path.display()
            );
            return Vec::new();
        }
        Ok(_) => std::fs::read_to_string(path),
        Err(e) => Err(e),
    };
    match text.map(|t| serde_json::from_str::<File>(&t)) {
        Ok(Ok(f)) => f
            .islands
            .into_iter()
            // The id commits to the keys: an entry whose id does not match is not an island.
            .filter(|r| r.keys.session_id() == r.session)
            .take(MAX_REMEMBERED_ISLANDS)
            .collect(),
        Ok(Err(e)) => {
            warn!(
                "{} is not a remembered-islands file ({e}); starting without it",
                path.display()
            );
            Vec::new()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warn!("cannot read {}: {e}; starting without it", path.display());
            Vec::new()
        }
    }
}

/// Writes `file` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed over the old one.
fn write(path: &Path, file: &File) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(file).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_router::auth::{self, Capability};
    use isthmus_router::wire::Role;

    fn keys(n: u8) -> IslandKeys {
        auth::island_keys(&Capability::from_parts(Role::Admin, [n; 32])).expect("admin")
    }

    #[tokio::test]
    async fn islands_survive_a_restart_without_their_secret() {
        let dir = std::env::temp_dir().join(format!("isthmus-remember-{}", uuid::Uuid::new_v4()));
        let path = dir.join("router-islands-7470.json");
        let k = keys(3);
        let opts = CreateOptions {
            tick_interval_ms: Some(20),
            announce_membership: true,
            announce: Some(Announce {
                name: "cove".into(),
                destination: None,
                secret: Some([9; 32]),
            }),
        };
        let book = Book::open(Some(path.clone()));
        book.insert(Remembered::of(k.session_id(), k, &opts));
        let stop = CancellationToken::new();
        stop.cancel();
        book.run(stop).await;
        let text = std::fs::read_to_string(&path).expect("written");
        assert!(
            !text.contains(&format!("{:?}", [9u8; 32])),
            "no secret: {text}"
        );
        let again = Book::open(Some(path.clone()));
        let r = again.lookup(k.session_id(), &k).expect("remembered");
        assert_eq!(r.options().announce.and_then(|a| a.secret), None);
        assert_eq!(r.options().tick_interval_ms, Some(20));
        assert!(
            again.lookup(k.session_id(), &keys(4)).is_none(),
            "keys must match"
        );
        // An entry whose id does not commit to its keys is dropped on reading.
        let forged = format!(
            "{{\"islands\":[{}]}}",
            serde_json::to_string(&Remembered {
                session: keys(5).session_id(),
                ..r
            })
            .expect("json")
        );
        std::fs::write(&path, forged).expect("write");
        assert!(Book::open(Some(path))
            .lookup(keys(5).session_id(), &k)
            .is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
