//! The dispatcher's side of a router cluster (`isthmus router --cluster`): what a verified
//! hello gets on a clustered router, fencing, and the cluster part of the status page.
//!
//! For a hello the router reads the island's placement record (`isthmus_cluster`):
//! - **home is here**: serve it, at the record's epoch;
//! - **home elsewhere**: answer [`ServerFrame::Redirect`] with the home's contacts and epoch;
//!   but if the home does not answer a TCP connect (it just died; its lease has not lapsed yet),
//!   hold the hello ([`ClusterSettings::max_held_hellos`], [`ClusterSettings::hold_timeout`])
//!   and watch the record until it goes, then race to become home;
//! - **no home**: place it by load, here (then create the session at the record's epoch) or on
//!   a less loaded router (then redirect there). The loser of a race redirects to the winner.
//!
//! The cluster also remembers which islands exist (`known/<session>`, no lease: public keys
//! and create options, never a secret), written by the home at creation and deleted when the
//! island ends for good. A recovering hello for a known island is accepted from anywhere the
//! island could be joined, whatever the create policy of the router it lands on, as a lone
//! router accepts the islands it remembers ([`crate::remember`]).
//!
//! When the fencing clock says the lease may be gone, every session this router is home for
//! says goodbye at once and the router takes no joins until it has a new lease.

use crate::remember::Remembered;
use crate::{lock, Shared};
use isthmus_cluster::{
    ClusterConfig, ClusterError, LeaseState, Load, Member, PlaceOutcome, Placed, RouterRecord,
    WaitOutcome,
};
use isthmus_router::ids::SessionId;
use isthmus_router::wire::{self, Code, Contacts, HelloBody, ServerFrame};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Hellos held at once waiting for a dead home's record to go; past it they are refused busy.
pub const DEFAULT_MAX_HELD_HELLOS: usize = 1024;
/// How long a hello is held waiting for a dead home's record to go (past the lease TTL, so a
/// home that died just now is replaced within it).
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a home has to accept a TCP connection before it is taken for dead.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the router's load is read for the cluster (it is written far less often).
const LOAD_EVERY: Duration = Duration::from_secs(1);

/// A clustered router's settings.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// etcd and the cluster's name and timings.
    pub etcd: ClusterConfig,
    /// [`DEFAULT_MAX_HELD_HELLOS`].
    pub max_held_hellos: usize,
    /// [`DEFAULT_HOLD_TIMEOUT`].
    pub hold_timeout: Duration,
    /// [`DEFAULT_PROBE_TIMEOUT`].
    pub probe_timeout: Duration,
}

impl ClusterSettings {
    /// Settings for etcd `etcd` with the default bounds.
    pub fn new(etcd: ClusterConfig) -> ClusterSettings {
        ClusterSettings {
            etcd,
            max_held_hellos: DEFAULT_MAX_HELD_HELLOS,
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
        }
    }
}

/// What a verified hello gets on a clustered router.
pub(crate) enum Decision {
    /// Serve it here; `Some(epoch)` when this router is the island's home, and what the
    /// cluster remembers of the island for a recovering hello that may re-create it.
    Here(Option<u64>, Option<Remembered>),
    /// Send it to the home.
    Redirect(ServerFrame),
    /// Refuse it.
    Refuse(Code, String),
}

/// The cluster membership as the dispatcher uses it.
pub(crate) struct Clustered {
    member: Member,
    settings: ClusterSettings,
    held: Arc<Semaphore>,
    /// What the sessions homed here ask to write to etcd, in order.
    records: mpsc::UnboundedSender<Record>,
    records_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Record>>>,
    cancel: CancellationToken,
}

impl Clustered {
    /// Joins the cluster as router `id` reachable at `internal` / `external`.
    pub(crate) async fn join(
        settings: ClusterSettings,
        id: uuid::Uuid,
        internal: Vec<SocketAddr>,
        external: Option<SocketAddr>,
    ) -> Result<Clustered, ClusterError> {
        let cancel = CancellationToken::new();
        let me = RouterRecord {
            id,
            internal,
            external,
            load: Load::default(),
            draining: false,
            lease: 0,
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let member = Member::join(settings.etcd.clone(), me, cancel.clone()).await?;
        let (records, records_rx) = mpsc::unbounded_channel();
        Ok(Clustered {
            member,
            held: Arc::new(Semaphore::new(settings.max_held_hellos.max(1))),
            settings,
            records,
            records_rx: std::sync::Mutex::new(Some(records_rx)),
            cancel,
        })
    }

    /// One line for people: the cluster, this router's id, the routers it sees.
    pub(crate) fn summary(&self) -> String {
        format!(
            "in cluster {:?} as router {} ({} seen)",
            self.member.name(),
            self.member.id(),
            match self.member.routers().len() {
                1 => "1 router".to_string(),
                n => format!("{n} routers"),
            }
        )
    }

    /// Where the sessions homed here report their creation and end, so their records are
    /// written and deleted.
    pub(crate) fn records(&self) -> mpsc::UnboundedSender<Record> {
        self.records.clone()
    }

    /// Starts the tasks that follow the router: fencing, load, and writing and deleting its
    /// islands' records. Called once from `run`.
    pub(crate) fn start(shared: &Arc<Shared>) {
        let Some(c) = &shared.cluster else { return };
        let weak = Arc::downgrade(shared);
        let mut lease = c.member.lease_watch();
        let cancel = c.cancel.clone();
        tokio::spawn(async move {
            loop {
                let state = *lease.borrow_and_update();
                let fence_now = match state {
                    LeaseState::Lost => true,
                    LeaseState::Held { until, .. } => {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep_until(until) => *lease.borrow() == state,
                            r = lease.changed() => { if r.is_err() { return } continue }
                        }
                    }
                };
                if fence_now {
                    let Some(shared) = weak.upgrade() else { return };
                    fence(&shared).await;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = lease.changed() => if r.is_err() { return },
                }
            }
        });
        let weak = Arc::downgrade(shared);
        let cancel = c.cancel.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOAD_EVERY);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(shared) = weak.upgrade() else { return };
                if let Some(c) = &shared.cluster {
                    c.member.set_load(load_of(&shared));
                }
            }
        });
        let rx = lock(&c.records_rx).take();
        if let Some(mut rx) = rx {
            let member = c.member.clone();
            let cancel = c.cancel.clone();
            tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        _ = cancel.cancelled() => return,
                        n = rx.recv() => n,
                    };
                    let Some(next) = next else { return };
                    write(&member, next).await;
                }
            });
        }
    }

    /// Leaves the cluster (after the sessions said goodbye): the lease is revoked, so this
    /// router's islands are free for others at once.
    pub(crate) async fn leave(&self) {
        self.member.leave().await;
        self.cancel.cancel();
    }

    /// Other routers' contacts for a welcome (at most [`wire::MAX_CLUSTER_CONTACTS`], least
    /// loaded first, draining ones left out). A router alone in its cluster names itself, so its
    /// replicas keep it among their candidates: a fenced router takes them back with its next
    /// lease (its goodbye is 1010, which clients retry; older clients retry a 1000 only when
    /// their welcome named a cluster).
    pub(crate) fn others(&self, remote: bool) -> Vec<Contacts> {
        let me = self.member.id();
        let mut others: Vec<RouterRecord> = self
            .member
            .routers()
            .into_iter()
            .filter(|r| r.id != me && !r.draining)
            .collect();
        if others.is_empty() {
            others.push(self.member.me());
        }
        others.sort_by_key(|r| (r.load.score(), r.id));
        others
            .iter()
            .take(wire::MAX_CLUSTER_CONTACTS)
            .map(|r| contacts_of(r.id, &r.internal, r.external, remote))
            .collect()
    }

    /// What the verified hello `body` gets; `lan` says whether the peer is on our network.
    pub(crate) async fn decide(&self, shared: &Shared, body: &HelloBody, lan: bool) -> Decision {
        let id = body.session;
        // Past the fencing deadline counts as lost even before the lease keeper says so.
        let held = match self.member.lease() {
            LeaseState::Held { id, until } if until > tokio::time::Instant::now() => Some(id),
            _ => None,
        };
        let Some(lease) = held else {
            return Decision::Refuse(
                Code::BUSY,
                "this router lost its cluster lease and takes no joins until it has a new one; try another router of the cluster".into(),
            );
        };
        if let Some(epoch) = lock(&shared.registry)
            .sessions
            .get(&id)
            .and_then(|s| s.epoch)
        {
            return Decision::Here(Some(epoch), None);
        }
        let etcd_down = |e: ClusterError| {
            Decision::Refuse(
                Code::BUSY,
                format!("this router cannot reach its cluster's etcd ({e}); try again, or another router"),
            )
        };
        // A record changes under us only in a race or a failover: a few rounds settle it.
        for _ in 0..4 {
            let placed = match self.member.lookup(id.0).await {
                Ok(p) => p,
                Err(e) => return etcd_down(e),
            };
            match placed {
                Some(p) if p.placement.home == self.member.id() => {
                    if p.lease == lease {
                        // Placed here (perhaps by another router) for a hello that may
                        // re-create the island: the session needs what the cluster knows.
                        return match self.known(body).await {
                            Ok(known) => Decision::Here(Some(p.epoch as u64), known),
                            Err(e) => etcd_down(e),
                        };
                    }
                    // Left from an older lease of ours: those sessions were fenced.
                    if let Err(e) = self.member.release(id.0, p.epoch, false).await {
                        return etcd_down(e);
                    }
                }
                Some(p) => {
                    let returning = body.recover.is_some() || body.resume_from.is_some();
                    if returning && !self.answers(&p).await {
                        // The home just died (its replicas are knocking here): wait for its
                        // lease to lapse, then race to become home.
                        let Ok(_permit) = self.held.clone().try_acquire_owned() else {
                            return Decision::Refuse(
                                Code::BUSY,
                                format!("this router already holds {} hellos waiting for dead homes; try again shortly", self.settings.max_held_hellos),
                            );
                        };
                        info!(session = %id, home = %p.placement.home, "the island's home does not answer; holding the hello until its lease lapses");
                        match self
                            .member
                            .wait_gone(id.0, p.epoch, self.settings.hold_timeout)
                            .await
                        {
                            Ok(WaitOutcome::Gone | WaitOutcome::Replaced(_)) => continue,
                            Ok(WaitOutcome::TimedOut) => {
                                return Decision::Refuse(
                                    Code::BUSY,
                                    format!("the island's home {} does not answer and still holds its lease after {:?}; try again", p.placement.home, self.settings.hold_timeout),
                                )
                            }
                            Err(e) => return etcd_down(e),
                        }
                    }
                    return Decision::Redirect(redirect(&p, !lan));
                }
                None => {
                    // A recovering hello re-creates an island whatever the create policy if
                    // the cluster (or this router's own book) remembers it; otherwise the
                    // policy applies as to a new island. A record placed for a hello then
                    // refused is deleted again.
                    let known = match self.known(body).await {
                        Ok(known) => known,
                        Err(e) => return etcd_down(e),
                    };
                    let allowed = shared.cfg.create.check(lan).is_ok();
                    let creating = if body.create.is_some() {
                        allowed
                    } else {
                        body.recover.is_some()
                            && (allowed
                                || known.is_some()
                                || shared.book.lookup(id, &body.keys).is_some())
                    };
                    if !creating || body.control {
                        // Nothing to place: the ordinary path refuses it with the right words.
                        return Decision::Here(None, None);
                    }
                    let (me, others) = self.member.candidates(load_of(shared));
                    let target = isthmus_cluster::choose_home(me, &others).unwrap_or(me.id);
                    let home = if target == me.id {
                        self.member.me()
                    } else {
                        match self.member.router(target) {
                            Some(r) => r,
                            None => self.member.me(),
                        }
                    };
                    match self.member.place(id.0, &home).await {
                        Ok(PlaceOutcome::Won(epoch)) if home.id == me.id => {
                            info!(session = %id, epoch, "placed the island here");
                            return Decision::Here(Some(epoch as u64), known);
                        }
                        Ok(PlaceOutcome::Won(epoch)) => {
                            self.member.note_placed(home.id);
                            info!(session = %id, epoch, home = %home.id, "placed the island on a less loaded router");
                            let p = Placed {
                                placement: isthmus_cluster::Placement::at(&home),
                                epoch,
                                lease: home.lease,
                            };
                            return Decision::Redirect(redirect(&p, !lan));
                        }
                        // Lost the race: the next round redirects to the winner.
                        Ok(PlaceOutcome::Taken(_)) => continue,
                        Err(e) if home.id != me.id => {
                            // The target's lease may have just lapsed: place it here instead.
                            warn!(session = %id, "placing on {} failed: {e}; placing here", home.id);
                            match self.member.place(id.0, &self.member.me()).await {
                                Ok(PlaceOutcome::Won(epoch)) => {
                                    return Decision::Here(Some(epoch as u64), known)
                                }
                                Ok(PlaceOutcome::Taken(_)) => continue,
                                Err(e) => return etcd_down(e),
                            }
                        }
                        Err(e) => return etcd_down(e),
                    }
                }
            }
        }
        Decision::Refuse(
            Code::BUSY,
            "the island's placement kept changing while this router looked it up; try again".into(),
        )
    }

    /// What the cluster remembers of the island of a recovering hello that could re-create it
    /// (one linearizable read), if the record's keys are the hello's.
    async fn known(&self, body: &HelloBody) -> Result<Option<Remembered>, ClusterError> {
        if body.recover.is_none() || body.create.is_some() || body.control {
            return Ok(None);
        }
        let Some(value) = self.member.known(body.session.0).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<Remembered>(&value) {
            Ok(r) if r.session == body.session && r.keys == body.keys => Ok(Some(r)),
            Ok(_) => {
                warn!(session = %body.session, "the cluster's known record of this island has other keys; ignored (check what else writes under /isthmus/)");
                Ok(None)
            }
            Err(e) => {
                warn!(session = %body.session, "the cluster's known record of this island is not readable ({e}); ignored");
                Ok(None)
            }
        }
    }

    /// Whether the home of `p` accepts a TCP connection within the probe timeout.
    async fn answers(&self, p: &Placed) -> bool {
        let addrs: Vec<SocketAddr> = p
            .placement
            .internal
            .iter()
            .copied()
            .chain(p.placement.external)
            .take(wire::MAX_CLUSTER_CONTACTS)
            .collect();
        let tries = addrs.into_iter().map(|a| async move {
            tokio::time::timeout(
                self.settings.probe_timeout,
                tokio::net::TcpStream::connect(a),
            )
            .await
            .is_ok_and(|r| r.is_ok())
        });
        futures_util::future::join_all(tries)
            .await
            .into_iter()
            .any(|ok| ok)
    }

    /// The cluster's routers and where islands live, for the status page.
    pub(crate) async fn view(&self) -> ClusterView {
        let me = self.member.id();
        let routers = self
            .member
            .routers()
            .into_iter()
            .map(|r| RouterView {
                here: r.id == me,
                id: r.id.to_string(),
                contacts: r
                    .internal
                    .iter()
                    .chain(r.external.iter())
                    .map(|a| a.to_string())
                    .collect(),
                sessions: r.load.sessions,
                replicas: r.load.replicas,
                draining: r.draining,
            })
            .collect();
        let (islands, error) = match self.member.islands().await {
            Ok(list) => (
                list.into_iter()
                    .map(|(session, p)| IslandView {
                        session: session.to_string(),
                        home: p.placement.home.to_string(),
                        epoch: p.epoch as u64,
                    })
                    .collect(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        ClusterView {
            name: self.member.name().to_string(),
            router: me.to_string(),
            lease: matches!(self.member.lease(), LeaseState::Held { .. }),
            routers,
            islands,
            error,
            etcd_ops: self.member.ops(),
        }
    }
}

/// The cluster part of `/status.json`.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct ClusterView {
    /// The cluster's name.
    pub name: String,
    /// This router's id.
    pub router: String,
    /// Whether this router holds its lease (it serves and takes joins only then).
    pub lease: bool,
    /// Every router of the cluster, this one included.
    pub routers: Vec<RouterView>,
    /// Where islands live (at most `isthmus_cluster::member::MAX_LISTED_ISLANDS`).
    pub islands: Vec<IslandView>,
    /// Why the islands could not be read, if they could not.
    pub error: Option<String>,
    /// etcd requests this router made.
    pub etcd_ops: isthmus_cluster::OpCounts,
}

/// One router in [`ClusterView`].
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct RouterView {
    /// Its id.
    pub id: String,
    /// Whether it is the router answering.
    pub here: bool,
    /// Its contact points.
    pub contacts: Vec<String>,
    /// Sessions, as it last wrote.
    pub sessions: u64,
    /// Replicas, as it last wrote.
    pub replicas: u64,
    /// Whether it takes no new islands.
    pub draining: bool,
}

/// One island in [`ClusterView`].
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct IslandView {
    /// Its session id.
    pub session: String,
    /// Its home router's id.
    pub home: String,
    /// Its epoch.
    pub epoch: u64,
}

fn contacts_of(
    router: uuid::Uuid,
    internal: &[SocketAddr],
    external: Option<SocketAddr>,
    remote: bool,
) -> Contacts {
    Contacts {
        internal: internal.to_vec(),
        external,
        remote,
        router,
    }
}

fn redirect(p: &Placed, remote: bool) -> ServerFrame {
    ServerFrame::Redirect {
        contacts: vec![contacts_of(
            p.placement.home,
            &p.placement.internal,
            p.placement.external,
            remote,
        )],
        epoch: p.epoch as u64,
    }
}

/// What a session homed here asks the cluster to write, in order (so an island's end always
/// follows its creation).
pub(crate) enum Record {
    /// An island was created here: the cluster remembers that it exists.
    Created(Remembered),
    /// Placed here for a hello that was then refused: free the placement.
    Refused(SessionId, u64),
    /// An island homed here ended for good (closed by its admin, or lingered out): free the
    /// placement and forget the island.
    Ended(SessionId, u64),
}

async fn write(member: &Member, record: Record) {
    let (id, result) = match record {
        Record::Created(r) => (
            r.session,
            member
                .remember(r.session.0, isthmus_cluster::record::encode(&r))
                .await,
        ),
        Record::Refused(id, epoch) => (
            id,
            member.release(id.0, epoch as i64, false).await.map(drop),
        ),
        Record::Ended(id, epoch) => (id, member.release(id.0, epoch as i64, true).await.map(drop)),
    };
    if let Err(e) = result {
        warn!(session = %id, "cannot write the island's cluster records: {e}; a placement goes with this router's lease, but the island may stay known (delete /isthmus/<cluster>/known/{id} with etcdctl if it ended)");
    }
}

/// The router's load now.
fn load_of(shared: &Shared) -> Load {
    Load {
        sessions: lock(&shared.registry).sessions.len() as u64,
        replicas: shared.cfg.driver.stats.replicas() as u64,
        cpu_percent: 0,
    }
}

/// Stops every session this router is home for: the lease that made it home may be gone.
async fn fence(shared: &Shared) {
    let slots: Vec<crate::Slot> = {
        let mut reg = lock(&shared.registry);
        let ids: Vec<SessionId> = reg
            .sessions
            .iter()
            .filter(|(_, s)| s.epoch.is_some())
            .map(|(id, _)| *id)
            .collect();
        ids.iter()
            .filter_map(|id| reg.sessions.remove(id))
            .collect()
    };
    if slots.is_empty() {
        return;
    }
    warn!(
        sessions = slots.len(),
        "this router lost its cluster lease: its islands stop here and move to other routers"
    );
    for slot in &slots {
        slot.handle
            .shutdown_with(
                Code::MOVING,
                "this router lost its cluster lease; the island moves to another router of the cluster",
            )
            .await;
    }
}
