//! The etcd side: one router's membership in a cluster (a thin tokio driver over `etcd-client`).
//!
//! [`Member::join`] connects, grants the lease, writes `routers/<id>` under it and starts two
//! tasks: the lease keeper (a keep-alive every second, fed to the [`FenceClock`]; a new lease
//! and a fresh registration when the old one is gone) and the watch of `routers/`. Everything
//! else is one request each: [`Member::lookup`], [`Member::place`], [`Member::release`],
//! [`Member::wait_gone`], [`Member::islands`], [`Member::remember`], [`Member::known`].

use crate::fence::FenceClock;
use crate::keys::Keys;
use crate::placement::{Candidate, Load, LoadGate};
use crate::record::{self, Placement, RouterRecord};
use crate::ClusterError;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

/// Placement records read at most per status request.
pub const MAX_LISTED_ISLANDS: i64 = 1000;
/// Routers a cluster view holds at most; records past it are ignored (and logged).
pub const MAX_ROUTERS: usize = 4096;

/// How to reach etcd and how to behave in the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// etcd client endpoints, `HOST:PORT` each.
    pub endpoints: Vec<String>,
    /// The cluster's name, the key prefix's last segment.
    pub name: String,
    /// Lease TTL ([`crate::DEFAULT_LEASE_TTL`]).
    pub ttl: Duration,
    /// Keep-alive period ([`crate::DEFAULT_KEEP_ALIVE_EVERY`]).
    pub keep_alive_every: Duration,
    /// Fencing margin ([`crate::DEFAULT_FENCE_MARGIN`]).
    pub fence_margin: Duration,
    /// Load writes at most this often ([`crate::DEFAULT_LOAD_EVERY`]).
    pub load_every: Duration,
    /// Time allowed per etcd request ([`crate::DEFAULT_OP_TIMEOUT`]).
    pub op_timeout: Duration,
}

impl ClusterConfig {
    /// A configuration from a `--cluster` URL (`etcd://HOST:PORT[,HOST:PORT...]`) and a cluster
    /// name, with the default timings.
    pub fn from_url(url: &str, name: &str) -> Result<ClusterConfig, ClusterError> {
        Keys::new(name)?;
        Ok(ClusterConfig {
            endpoints: parse_url(url)?,
            name: name.into(),
            ttl: crate::DEFAULT_LEASE_TTL,
            keep_alive_every: crate::DEFAULT_KEEP_ALIVE_EVERY,
            fence_margin: crate::DEFAULT_FENCE_MARGIN,
            load_every: crate::DEFAULT_LOAD_EVERY,
            op_timeout: crate::DEFAULT_OP_TIMEOUT,
        })
    }
}

/// The endpoints of `etcd://HOST:PORT[,HOST:PORT...]`.
pub fn parse_url(url: &str) -> Result<Vec<String>, ClusterError> {
    let rest = url.strip_prefix("etcd://").ok_or_else(|| {
        ClusterError::BadUrl(format!("--cluster {url:?} does not start with etcd://"))
    })?;
    let mut out = Vec::new();
    for part in rest.split(',') {
        let part = part.trim().trim_end_matches('/');
        let (host, port) = part.rsplit_once(':').ok_or_else(|| {
            ClusterError::BadUrl(format!("--cluster {url:?}: {part:?} has no :PORT"))
        })?;
        let host_ok = !host.is_empty()
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
            });
        if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(ClusterError::BadUrl(format!(
                "--cluster {url:?}: {part:?} is not HOST:PORT"
            )));
        }
        out.push(part.to_string());
    }
    Ok(out)
}

/// Whether this router holds a lease now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Held: sessions may stamp until `until` unless a later keep-alive extends it.
    Held {
        /// The lease id.
        id: i64,
        /// The fencing deadline.
        until: Instant,
    },
    /// Not held: stamp nothing, take no joins.
    Lost,
}

/// An island's placement as read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// Where it lives.
    pub placement: Placement,
    /// Its epoch: the record's mod revision.
    pub epoch: i64,
    /// The lease the record lives under.
    pub lease: i64,
}

/// What a placement transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlaceOutcome {
    /// The record is ours as asked, at this epoch.
    Won(i64),
    /// Another placement was there first.
    Taken(Placed),
}

/// What waiting for a record to go saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// It is gone: the island has no home.
    Gone,
    /// It was replaced (a new home took it).
    Replaced(Placed),
    /// It was still there at the deadline.
    TimedOut,
}

/// etcd requests made so far, by kind (for BENCHMARKS.md's operations per island).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpCounts {
    /// Reads (gets).
    pub reads: u64,
    /// Writes: puts, transactions, deletes, lease grants and revokes.
    pub writes: u64,
    /// Keep-alives sent.
    pub keep_alives: u64,
    /// Watches opened.
    pub watches: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    keep_alives: AtomicU64,
    watches: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    cfg: ClusterConfig,
    keys: Keys,
    client: Client,
    me: Mutex<RouterRecord>,
    routers: Mutex<BTreeMap<Uuid, RouterRecord>>,
    lease: watch::Sender<LeaseState>,
    counters: Counters,
    cancel: CancellationToken,
}

/// This router's membership. Cheap to clone; the tasks stop when [`Member::leave`] is called or
/// the token given to [`Member::join`] fires.
#[derive(Clone)]
pub struct Member {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn etcd_err(op: &'static str) -> impl Fn(etcd_client::Error) -> ClusterError {
    move |e| ClusterError::Etcd {
        op,
        message: e.to_string(),
    }
}

impl Member {
    /// Connects to etcd, grants this router's lease and registers `me` (its id, contacts and
    /// load) under it, reads the routers already there, and starts keeping the lease and
    /// watching the routers.
    pub async fn join(
        cfg: ClusterConfig,
        mut me: RouterRecord,
        cancel: CancellationToken,
    ) -> Result<Member, ClusterError> {
        let keys = Keys::new(&cfg.name)?;
        let endpoints = cfg.endpoints.join(",");
        let unreachable = |message: String| ClusterError::Unreachable {
            endpoints: endpoints.clone(),
            message,
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(cfg.op_timeout)
            .with_timeout(cfg.op_timeout)
            .with_keep_alive(Duration::from_secs(2), cfg.op_timeout);
        let connect = Client::connect(cfg.endpoints.clone(), Some(options));
        let mut client = tokio::time::timeout(cfg.op_timeout, connect)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", cfg.op_timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
        // The connection may be lazy: one real request proves etcd answers.
        tokio::time::timeout(cfg.op_timeout, client.status())
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", cfg.op_timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
        let (tx, _) = watch::channel(LeaseState::Lost);
        let member = Member {
            inner: Arc::new(Inner {
                keys,
                client,
                me: Mutex::new(me.clone()),
                routers: Mutex::default(),
                lease: tx,
                counters: Counters::default(),
                cancel,
                cfg,
            }),
        };
        let clock = member.register(&mut me).await?;
        let revision = member.load_routers().await?;
        info!(
            router = %me.id,
            cluster = %member.inner.cfg.name,
            lease = me.lease,
            routers = member.routers().len(),
            "joined the cluster"
        );
        tokio::spawn(member.clone().keep_lease(clock));
        tokio::spawn(member.clone().watch_routers(revision));
        Ok(member)
    }

    /// Grants a lease and writes the router record under it; sets the lease state.
    async fn register(&self, me: &mut RouterRecord) -> Result<FenceClock, ClusterError> {
        let i = &self.inner;
        let mut client = i.client.clone();
        let sent = Instant::now();
        let ttl_secs = i64::try_from(i.cfg.ttl.as_secs().max(1)).unwrap_or(5);
        bump(&i.counters.writes);
        let grant = self
            .timed("lease grant", client.lease_grant(ttl_secs, None))
            .await?
            .map_err(etcd_err("lease grant"))?;
        let ttl = Duration::from_secs(grant.ttl().max(1).unsigned_abs());
        let clock = FenceClock::granted(sent.into_std(), ttl, i.cfg.fence_margin);
        me.lease = grant.id();
        {
            let mut mine = lock(&i.me);
            mine.lease = grant.id();
            *me = mine.clone();
        }
        self.put_me().await?;
        if let Some(until) = clock.valid_until() {
            i.lease.send_replace(LeaseState::Held {
                id: grant.id(),
                until: until.into(),
            });
        }
        Ok(clock)
    }

    async fn put_me(&self) -> Result<(), ClusterError> {
        let i = &self.inner;
        let me = lock(&i.me).clone();
        let mut client = i.client.clone();
        bump(&i.counters.writes);
        self.timed(
            "router put",
            client.put(
                i.keys.router(me.id),
                record::encode(&me),
                Some(PutOptions::new().with_lease(me.lease)),
            ),
        )
        .await?
        .map_err(etcd_err("router put"))?;
        lock(&i.routers).insert(me.id, me);
        Ok(())
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, ClusterError> {
        let timeout = self.inner.cfg.op_timeout;
        tokio::time::timeout(timeout, f)
            .await
            .map_err(|_| ClusterError::Timeout { op, timeout })
    }

    /// Reads every router record; returns the revision to watch from.
    async fn load_routers(&self) -> Result<i64, ClusterError> {
        let i = &self.inner;
        let mut client = i.client.clone();
        bump(&i.counters.reads);
        let resp = self
            .timed(
                "routers get",
                client.get(i.keys.routers(), Some(GetOptions::new().with_prefix())),
            )
            .await?
            .map_err(etcd_err("routers get"))?;
        let mut map = BTreeMap::new();
        for kv in resp.kvs() {
            if map.len() >= MAX_ROUTERS {
                warn!("more than {MAX_ROUTERS} routers in the cluster; ignoring the rest");
                break;
            }
            match record::decode::<RouterRecord>(kv.key(), kv.value()) {
                Ok(r) => {
                    map.insert(r.id, r);
                }
                Err(e) => warn!("{e}"),
            }
        }
        let me = lock(&i.me).clone();
        map.insert(me.id, me);
        *lock(&i.routers) = map;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Keeps the lease alive; on losing it, fences (the state says Lost) and gets a new one.
    async fn keep_lease(self, mut clock: FenceClock) {
        let i = self.inner.clone();
        let mut gate = LoadGate::new(i.cfg.load_every);
        gate.due(Instant::now().into_std(), lock(&i.me).load);
        'lease: loop {
            let id = lock(&i.me).lease;
            // One keep-alive stream per attempt; a broken one is opened again while the lease
            // may still hold.
            let mut client = i.client.clone();
            let opened = tokio::select! {
                _ = i.cancel.cancelled() => return,
                r = self.timed("keep-alive", client.lease_keep_alive(id)) => r,
            };
            let mut tick = tokio::time::interval(i.cfg.keep_alive_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stream_and_keeper = match opened {
                Ok(Ok((keeper, stream))) => Some((keeper, stream)),
                Ok(Err(e)) => {
                    warn!("cannot keep the cluster lease alive: {e}; retrying");
                    None
                }
                Err(e) => {
                    warn!("{e}");
                    None
                }
            };
            loop {
                let deadline = clock
                    .valid_until()
                    .map(Instant::from_std)
                    .unwrap_or_else(Instant::now);
                let Some((keeper, stream)) = stream_and_keeper.as_mut() else {
                    // No stream: wait a tick (or the deadline) and open one again.
                    tokio::select! {
                        _ = i.cancel.cancelled() => return,
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = tokio::time::sleep(i.cfg.keep_alive_every) => continue 'lease,
                    }
                };
                tokio::select! {
                    _ = i.cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = tick.tick() => {
                        if clock.may_send() {
                            let now = Instant::now();
                            if keeper.keep_alive().await.is_ok() {
                                bump(&i.counters.keep_alives);
                                clock.sent(now.into_std());
                            }
                        }
                        let load = lock(&i.me).load;
                        if gate.due(Instant::now().into_std(), load) {
                            let this = self.clone();
                            // Off the keep-alive path: a slow put must not delay keep-alives.
                            tokio::spawn(async move {
                                if let Err(e) = this.put_me().await {
                                    warn!("cannot write this router's load: {e}");
                                }
                            });
                        }
                    }
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            if !clock.answered(resp.ttl()) {
                                warn!(lease = id, "etcd says this router's lease is gone");
                                break;
                            }
                            if let Some(until) = clock.valid_until() {
                                i.lease.send_replace(LeaseState::Held { id, until: until.into() });
                            }
                        }
                        Ok(None) | Err(_) => {
                            clock.stream_lost();
                            stream_and_keeper = None;
                        }
                    },
                }
            }
            // The lease may already be gone in etcd: stop stamping and taking joins now.
            clock.lost();
            i.lease.send_replace(LeaseState::Lost);
            warn!(
                lease = id,
                "lost the cluster lease: this router stops serving its islands and gets a new lease"
            );
            // Best effort: an old lease that still lives would keep records naming us.
            let mut client = i.client.clone();
            bump(&i.counters.writes);
            let _ = self.timed("lease revoke", client.lease_revoke(id)).await;
            let mut backoff = i.cfg.keep_alive_every;
            loop {
                let mut me = lock(&i.me).clone();
                match self.register(&mut me).await {
                    Ok(c) => {
                        clock = c;
                        gate.reset();
                        gate.due(Instant::now().into_std(), me.load);
                        info!(
                            lease = me.lease,
                            "got a new cluster lease; taking joins again"
                        );
                        break;
                    }
                    Err(e) => warn!("cannot get a new cluster lease: {e}; retrying in {backoff:?}"),
                }
                tokio::select! {
                    _ = i.cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }

    /// Keeps the routers map current from a watch of `routers/`; reads it all again after a
    /// broken watch.
    async fn watch_routers(self, mut revision: i64) {
        let i = self.inner.clone();
        loop {
            let mut client = i.client.clone();
            bump(&i.counters.watches);
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let watched = tokio::select! {
                _ = i.cancel.cancelled() => return,
                r = self.timed("routers watch", client.watch(i.keys.routers(), Some(opts))) => r,
            };
            if let Ok(Ok(mut stream)) = watched {
                loop {
                    let msg = tokio::select! {
                        _ = i.cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let Ok(Some(resp)) = msg else { break };
                    if resp.canceled() {
                        break;
                    }
                    let mut map = lock(&i.routers);
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        revision = revision.max(kv.mod_revision());
                        let Some(id) = i.keys.router_of(kv.key()) else {
                            continue;
                        };
                        match ev.event_type() {
                            EventType::Delete => {
                                map.remove(&id);
                            }
                            EventType::Put => {
                                match record::decode::<RouterRecord>(kv.key(), kv.value()) {
                                    Ok(r) if map.len() < MAX_ROUTERS || map.contains_key(&id) => {
                                        map.insert(id, r);
                                    }
                                    Ok(_) => {
                                        warn!("more than {MAX_ROUTERS} routers; ignoring {id}")
                                    }
                                    Err(e) => warn!("{e}"),
                                }
                            }
                        }
                    }
                }
            }
            tokio::select! {
                _ = i.cancel.cancelled() => return,
                _ = tokio::time::sleep(i.cfg.keep_alive_every) => {}
            }
            if let Ok(r) = self.load_routers().await {
                revision = r;
            }
        }
    }

    /// This router's id.
    pub fn id(&self) -> Uuid {
        lock(&self.inner.me).id
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    /// This router's record as last set (its lease included).
    pub fn me(&self) -> RouterRecord {
        lock(&self.inner.me).clone()
    }

    /// The lease state now.
    pub fn lease(&self) -> LeaseState {
        *self.inner.lease.borrow()
    }

    /// Follows the lease state.
    pub fn lease_watch(&self) -> watch::Receiver<LeaseState> {
        self.inner.lease.subscribe()
    }

    /// The routers of the cluster as last seen (this one included).
    pub fn routers(&self) -> Vec<RouterRecord> {
        let me = self.me();
        let mut all: Vec<RouterRecord> = lock(&self.inner.routers)
            .values()
            .filter(|r| r.id != me.id)
            .cloned()
            .collect();
        all.push(me);
        all.sort_by_key(|r| r.id);
        all
    }

    /// A router of the cluster by id.
    pub fn router(&self, id: Uuid) -> Option<RouterRecord> {
        if id == self.id() {
            return Some(self.me());
        }
        lock(&self.inner.routers).get(&id).cloned()
    }

    /// The routers as placement candidates, this one with `mine` (its load now, fresher than
    /// what it last wrote) and first.
    pub fn candidates(&self, mine: Load) -> (Candidate, Vec<Candidate>) {
        let me = self.me();
        let others = self
            .routers()
            .into_iter()
            .filter(|r| r.id != me.id)
            .map(|r| Candidate {
                id: r.id,
                load: r.load,
                draining: r.draining,
            })
            .collect();
        (
            Candidate {
                id: me.id,
                load: mine,
                draining: me.draining,
            },
            others,
        )
    }

    /// Counts an island this router just placed on router `id` (with its first replica) in the
    /// load it sees for that router, until that router writes its own: without this, every
    /// island created in a burst would go to the same idle router, whose written load lags.
    pub fn note_placed(&self, id: Uuid) {
        if let Some(r) = lock(&self.inner.routers).get_mut(&id) {
            r.load.sessions = r.load.sessions.saturating_add(1);
            r.load.replicas = r.load.replicas.saturating_add(1);
        }
    }

    /// Sets the load to write (when it moved by 10%, at most once per `load_every`).
    pub fn set_load(&self, load: Load) {
        lock(&self.inner.me).load = load;
    }

    /// Marks this router draining (it takes no new islands) and writes it now.
    pub async fn drain(&self) -> Result<(), ClusterError> {
        lock(&self.inner.me).draining = true;
        self.put_me().await
    }

    /// The etcd requests made so far.
    pub fn ops(&self) -> OpCounts {
        let c = &self.inner.counters;
        OpCounts {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            keep_alives: c.keep_alives.load(Ordering::Relaxed),
            watches: c.watches.load(Ordering::Relaxed),
        }
    }

    /// Where the island lives, if it has a home (a serializable read: a stale answer costs an
    /// extra hop at worst, since the home checks).
    pub async fn lookup(&self, session: Uuid) -> Result<Option<Placed>, ClusterError> {
        let i = &self.inner;
        let key = i.keys.island(session);
        let mut client = i.client.clone();
        bump(&i.counters.reads);
        let resp = self
            .timed(
                "placement get",
                client.get(key, Some(GetOptions::new().with_serializable())),
            )
            .await?
            .map_err(etcd_err("placement get"))?;
        resp.kvs().first().map(placed).transpose()
    }

    /// Makes `home` the island's home if it has none: `create_revision == 0` -> put under the
    /// home's lease. The record's revision is the epoch. Fails when the home's lease is gone.
    pub async fn place(
        &self,
        session: Uuid,
        home: &RouterRecord,
    ) -> Result<PlaceOutcome, ClusterError> {
        let i = &self.inner;
        let key = i.keys.island(session);
        let value = record::encode(&Placement::at(home));
        // A record deleted between the failed compare and our read: try again, a few times.
        for _ in 0..3 {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(home.lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let mut client = i.client.clone();
            bump(&i.counters.writes);
            let resp = self
                .timed("placement txn", client.txn(txn))
                .await?
                .map_err(etcd_err("placement txn"))?;
            if resp.succeeded() {
                let epoch = resp.header().map_or(0, |h| h.revision());
                return Ok(PlaceOutcome::Won(epoch));
            }
            for op in resp.op_responses() {
                if let TxnOpResponse::Get(g) = op {
                    if let Some(kv) = g.kvs().first() {
                        return Ok(PlaceOutcome::Taken(placed(kv)?));
                    }
                }
            }
        }
        Err(ClusterError::Etcd {
            op: "placement txn",
            message: "the record kept changing".into(),
        })
    }

    /// Deletes the island's record if it is still the one of `epoch`; with `forget`, the island
    /// ended for good (closed, or lingered out), so its [`Member::remember`] record goes too, in
    /// the same request. Whether the placement record was deleted.
    pub async fn release(
        &self,
        session: Uuid,
        epoch: i64,
        forget: bool,
    ) -> Result<bool, ClusterError> {
        let i = &self.inner;
        let key = i.keys.island(session);
        let known = forget.then(|| TxnOp::delete(i.keys.known(session), None));
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, epoch)])
            .and_then(
                std::iter::once(TxnOp::delete(key, None))
                    .chain(known.clone())
                    .collect::<Vec<_>>(),
            )
            .or_else(known.into_iter().collect::<Vec<_>>());
        let mut client = i.client.clone();
        bump(&i.counters.writes);
        let resp = self
            .timed("placement delete", client.txn(txn))
            .await?
            .map_err(etcd_err("placement delete"))?;
        Ok(resp.succeeded())
    }

    /// Records that the island `session` exists, with `value` (public keys and create options,
    /// never a secret), without a lease: the record outlives its home, so the router that
    /// re-creates the island from its replicas accepts them as a lone router accepts the
    /// islands it remembers. Deleted by [`Member::release`] with `forget`.
    pub async fn remember(&self, session: Uuid, value: Vec<u8>) -> Result<(), ClusterError> {
        let i = &self.inner;
        let mut client = i.client.clone();
        bump(&i.counters.writes);
        self.timed("known put", client.put(i.keys.known(session), value, None))
            .await?
            .map_err(etcd_err("known put"))?;
        Ok(())
    }

    /// What [`Member::remember`] recorded for `session`, if anything (a linearizable read: a
    /// refusal on a stale answer would cost the island its failover).
    pub async fn known(&self, session: Uuid) -> Result<Option<Vec<u8>>, ClusterError> {
        let i = &self.inner;
        let mut client = i.client.clone();
        bump(&i.counters.reads);
        let resp = self
            .timed("known get", client.get(i.keys.known(session), None))
            .await?
            .map_err(etcd_err("known get"))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Waits, at most `timeout`, for the record of `epoch` to go (its home's lease lapsed) or be
    /// replaced.
    pub async fn wait_gone(
        &self,
        session: Uuid,
        epoch: i64,
        timeout: Duration,
    ) -> Result<WaitOutcome, ClusterError> {
        let i = &self.inner;
        let key = i.keys.island(session);
        let mut client = i.client.clone();
        bump(&i.counters.watches);
        // From the record's own revision on: nothing that happens after the read is missed.
        let opts = WatchOptions::new().with_start_revision(epoch + 1);
        let deadline = Instant::now() + timeout;
        let mut stream =
            match tokio::time::timeout_at(deadline, client.watch(key, Some(opts))).await {
                Err(_) => return Ok(WaitOutcome::TimedOut),
                Ok(r) => r.map_err(etcd_err("placement watch"))?,
            };
        loop {
            let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => return Ok(WaitOutcome::TimedOut),
                Ok(m) => m.map_err(etcd_err("placement watch"))?,
            };
            let Some(resp) = msg else {
                return Err(ClusterError::Etcd {
                    op: "placement watch",
                    message: "the watch ended".into(),
                });
            };
            for ev in resp.events() {
                match (ev.event_type(), ev.kv()) {
                    (EventType::Delete, _) => return Ok(WaitOutcome::Gone),
                    (EventType::Put, Some(kv)) => return Ok(WaitOutcome::Replaced(placed(kv)?)),
                    _ => {}
                }
            }
        }
    }

    /// Where islands live, at most [`MAX_LISTED_ISLANDS`], by session id.
    pub async fn islands(&self) -> Result<Vec<(Uuid, Placed)>, ClusterError> {
        let i = &self.inner;
        let mut client = i.client.clone();
        bump(&i.counters.reads);
        let resp = self
            .timed(
                "placements get",
                client.get(
                    i.keys.islands(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_serializable()
                            .with_limit(MAX_LISTED_ISLANDS),
                    ),
                ),
            )
            .await?
            .map_err(etcd_err("placements get"))?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            if let Some(id) = i.keys.island_of(kv.key()) {
                out.push((id, placed(kv)?));
            }
        }
        Ok(out)
    }

    /// Leaves the cluster: stops the tasks and revokes the lease, so this router's key and every
    /// record under it go at once (its islands are free for other routers without waiting for
    /// the TTL).
    pub async fn leave(&self) {
        let i = &self.inner;
        i.cancel.cancel();
        let id = lock(&i.me).lease;
        i.lease.send_replace(LeaseState::Lost);
        let mut client = i.client.clone();
        bump(&i.counters.writes);
        match self.timed("lease revoke", client.lease_revoke(id)).await {
            Ok(Ok(_)) => info!("left the cluster"),
            Ok(Err(e)) => warn!("leaving the cluster: {e}; its records go when the lease lapses"),
            Err(e) => warn!("leaving the cluster: {e}; its records go when the lease lapses"),
        }
    }
}

fn placed(kv: &etcd_client::KeyValue) -> Result<Placed, ClusterError> {
    Ok(Placed {
        placement: record::decode(kv.key(), kv.value())?,
        epoch: kv.mod_revision(),
        lease: kv.lease(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_are_etcd_host_port_lists() {
        assert_eq!(
            parse_url("etcd://127.0.0.1:2379").expect("one"),
            vec!["127.0.0.1:2379"]
        );
        assert_eq!(
            parse_url("etcd://a.example:2379,b.example:2379/").expect("two"),
            vec!["a.example:2379", "b.example:2379"]
        );
        for bad in [
            "http://127.0.0.1:2379",
            "etcd://127.0.0.1",
            "etcd://:2379",
            "etcd://h:0",
            "etcd://h:99999",
            "etcd://h h:1",
        ] {
            let e = parse_url(bad).expect_err(bad).to_string();
            assert!(e.contains("etcd://HOST:PORT"), "{e}");
        }
        let e = ClusterConfig::from_url("etcd://h:1", "a/b").expect_err("bad name");
        assert!(e.to_string().contains("not usable"), "{e}");
    }
}
