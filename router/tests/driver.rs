//! The tokio driver over in-memory streams on tokio's paused clock: how connections end.

use bytes::{Bytes, BytesMut};
use isthmus_router::auth::{self, Capability, IslandKeys};
use isthmus_router::driver::{self, Attach, DriverConfig, Ending, SessionHandle};
use isthmus_router::ids::{ConnId, ReplicaId};
use isthmus_router::session::{JoinRequest, SessionConfig};
use isthmus_router::wire::{self, AdminCommand, ClientFrame, Code, Role, ServerFrame};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use uuid::Uuid;

fn admin() -> Capability {
    Capability::from_parts(Role::Admin, [3; 32])
}

fn keys() -> IslandKeys {
    auth::island_keys(&admin()).expect("an admin capability")
}

type Endings = Arc<Mutex<Vec<Ending>>>;

fn spawn(cfg: DriverConfig) -> (SessionHandle, tokio::task::JoinHandle<()>, Endings) {
    let keys = keys();
    let endings: Endings = Arc::default();
    let seen = endings.clone();
    let retire: driver::Retire = Box::new(move |ending, _| {
        seen.lock().expect("not poisoned").push(ending);
        true
    });
    let (handle, join) = driver::spawn_session(keys.session_id(), keys, cfg, retire);
    (handle, join, endings)
}

/// Attaches a replica over an in-memory pipe of `pipe` bytes; returns the replica's end.
fn attach(
    handle: &SessionHandle,
    n: u64,
    role: Role,
    control: bool,
    pipe: usize,
) -> (DuplexStream, [u8; 32]) {
    let (ours, theirs) = tokio::io::duplex(pipe);
    let nonce = [n as u8; 32];
    let request = JoinRequest {
        replica: ReplicaId(Uuid::from_u128(u128::from(n))),
        name: format!("r{n}"),
        role,
        resume_from: None,
        contacts: wire::Contacts::default(),
        created: n == 1,
        nonce,
        control,
        recover: None,
        cluster: Vec::new(),
    };
    let attach = Attach {
        conn: ConnId(n),
        request,
        stream: Box::new(theirs),
        leftover: BytesMut::new(),
        guard: None,
    };
    assert!(handle.attach(attach).is_ok(), "the session is running");
    (ours, nonce)
}

/// Reads to the end of the stream and splits it into frames; fails on a partial frame.
async fn read_all_frames(stream: &mut DuplexStream) -> Vec<ServerFrame> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read");
    let mut buf = BytesMut::from(&bytes[..]);
    let mut frames = Vec::new();
    while let Some(frame) = wire::decode::<ServerFrame>(&mut buf, usize::MAX).expect("whole frames")
    {
        frames.push(frame);
    }
    assert!(
        buf.is_empty(),
        "the stream ends with {} bytes of a cut frame",
        buf.len()
    );
    frames
}

async fn send(stream: &mut DuplexStream, frame: &ClientFrame) {
    stream.write_all(&wire::encode(frame)).await.expect("write");
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_gets_whole_frames_and_then_its_goodbye() {
    let cfg = DriverConfig {
        session: SessionConfig {
            // Above one event batch of sends (64 of them), which the session stamps before
            // the fast replica has read anything.
            max_outbound_bytes: 256 * 1024,
            ..SessionConfig::default()
        },
        ..DriverConfig::default()
    };
    let (handle, _join, _) = spawn(cfg);
    // The fast replica reads everything as it comes.
    let (fast, _) = attach(&handle, 1, Role::Replica, false, 64 * 1024);
    let (fast_read, mut fast_write) = tokio::io::split(fast);
    let reader = tokio::spawn(async move {
        let mut r = fast_read;
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink).await;
    });
    // The slow one's pipe holds a little over two messages; it reads nothing for now.
    let (mut slow, _) = attach(&handle, 2, Role::Replica, false, 2500);
    tokio::time::sleep(Duration::from_millis(10)).await;
    const SENDS: u64 = 600;
    let payload = Bytes::from(vec![5u8; 1000]);
    for client_seq in 1..=SENDS {
        let frame = ClientFrame::Send {
            client_seq,
            payload: payload.clone(),
        };
        fast_write
            .write_all(&wire::encode(&frame))
            .await
            .expect("write");
    }
    // Let the session stamp them all and give up on the slow replica.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let frames = read_all_frames(&mut slow).await;
    let last = frames.last().expect("some frames");
    assert!(
        matches!(last, ServerFrame::Goodbye { code, .. } if *code == Code::SLOW_CONSUMER),
        "ends with a slow-consumer goodbye: {last:?}"
    );
    let seqs: Vec<u64> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) => Some(m.seq.0),
            _ => None,
        })
        .collect();
    assert!(!seqs.is_empty(), "some messages arrived before the goodbye");
    assert!(
        seqs.len() < SENDS as usize,
        "it was cut off: {}",
        seqs.len()
    );
    assert!(
        seqs.iter().copied().eq(1..=seqs.len() as u64),
        "gap-free from 1: {seqs:?}"
    );
    drop(fast_write);
    let _ = reader.await;
}

#[tokio::test(start_paused = true)]
async fn an_admin_close_says_goodbye_to_everyone_and_ends_the_session() {
    let (handle, join, endings) = spawn(DriverConfig::default());
    let (mut member, _) = attach(&handle, 1, Role::Replica, false, 64 * 1024);
    let (mut control, nonce) = attach(&handle, 2, Role::Admin, true, 64 * 1024);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let command = AdminCommand::Close;
    let transcript = auth::admin_transcript(&nonce, handle.id(), 1, &command);
    let sig = admin().key_pair().sign(&transcript);
    send(
        &mut control,
        &ClientFrame::Admin {
            seq: 1,
            command,
            sig,
        },
    )
    .await;
    let frames = read_all_frames(&mut control).await;
    assert!(matches!(frames[0], ServerFrame::Welcome(_)));
    assert!(matches!(
        frames[1],
        ServerFrame::AdminDone {
            seq: 1,
            ok: true,
            ..
        }
    ));
    assert!(matches!(&frames[2], ServerFrame::Goodbye { code, .. } if *code == Code::CLOSED));
    assert_eq!(frames.len(), 3);
    let frames = read_all_frames(&mut member).await;
    assert!(
        matches!(frames.last(), Some(ServerFrame::Goodbye { code, .. }) if *code == Code::CLOSED),
        "{frames:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .expect("the session task ends")
        .expect("without panicking");
    assert_eq!(*endings.lock().expect("not poisoned"), vec![Ending::Closed]);
}

/// Message seqs among `frames`.
fn seqs(frames: &[ServerFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) => Some(m.seq.0),
            _ => None,
        })
        .collect()
}

/// Reads frames until message `seq` arrives; returns every frame read.
async fn read_until_seq<R: tokio::io::AsyncRead + Unpin>(
    r: &mut isthmus_router::framed::FrameReader<R>,
    seq: u64,
) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    loop {
        let frame: ServerFrame = r.read().await.expect("a whole frame");
        let done = matches!(&frame, ServerFrame::Message(m) if m.seq.0 == seq);
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

async fn send_many(stream: &mut DuplexStream, from: u64, to: u64, size: usize) {
    let payload = Bytes::from(vec![7u8; size]);
    for client_seq in from..=to {
        send(
            stream,
            &ClientFrame::Send {
                client_seq,
                payload: payload.clone(),
            },
        )
        .await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_socket_that_would_block_keeps_its_queue_and_drains_when_read() {
    // No ticks: they would queue a frame and so retry the write every 50 ms, hiding a
    // writable wake that never comes.
    let cfg = DriverConfig {
        session: SessionConfig {
            tick_interval: Duration::from_secs(3600),
            ..SessionConfig::default()
        },
        ..DriverConfig::default()
    };
    let (handle, _join, _) = spawn(cfg);
    let (mut sender, _) = attach(&handle, 1, Role::Replica, false, 1 << 20);
    // A pipe that holds about two messages: the direct write would block at once.
    let (blocked, _) = attach(&handle, 2, Role::Replica, false, 300);
    tokio::time::sleep(Duration::from_millis(10)).await;
    const N: u64 = 200;
    send_many(&mut sender, 1, N, 100).await;
    // Everything is stamped and queued while the replica reads nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut r = isthmus_router::framed::FrameReader::new(blocked, 1 << 20);
    let frames = tokio::time::timeout(Duration::from_secs(5), read_until_seq(&mut r, N))
        .await
        .expect("the socket's writable wake makes the session write the rest");
    assert_eq!(seqs(&frames), (1..=N).collect::<Vec<_>>());
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Goodbye { .. })),
        "not closed"
    );
    // Drained, it is back on the direct path: the next message comes at once.
    send_many(&mut sender, N + 1, N + 1, 100).await;
    let frames = read_until_seq(&mut r, N + 1).await;
    assert_eq!(seqs(&frames), vec![N + 1]);
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_is_closed_with_1003_while_the_others_keep_going() {
    let cfg = DriverConfig {
        session: SessionConfig {
            // A write round comes whenever a quarter of this is queued to one replica, so the
            // ones that read never near it, even when one read brings 64 sends at once.
            max_outbound_bytes: 32 * 1024,
            ..SessionConfig::default()
        },
        ..DriverConfig::default()
    };
    let (handle, _join, _) = spawn(cfg);
    let (sender, _) = attach(&handle, 1, Role::Replica, false, 1 << 20);
    let (sender_read, mut sender_write) = tokio::io::split(sender);
    let drain = tokio::spawn(async move {
        let mut r = sender_read;
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink).await;
    });
    let (mut slow, _) = attach(&handle, 2, Role::Replica, false, 2500);
    let (fast, _) = attach(&handle, 3, Role::Replica, false, 1 << 20);
    let fast = tokio::spawn(async move {
        let mut r = isthmus_router::framed::FrameReader::new(fast, 1 << 20);
        read_until_seq(&mut r, 601).await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let payload = Bytes::from(vec![5u8; 1000]);
    for client_seq in 1..=600 {
        let frame = ClientFrame::Send {
            client_seq,
            payload: payload.clone(),
        };
        sender_write
            .write_all(&wire::encode(&frame))
            .await
            .expect("write");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let frames = read_all_frames(&mut slow).await;
    assert!(
        matches!(frames.last(), Some(ServerFrame::Goodbye { code, .. }) if *code == Code::SLOW_CONSUMER),
        "{:?}",
        frames.last()
    );
    let slow_seqs = seqs(&frames);
    assert!(!slow_seqs.is_empty() && slow_seqs.len() < 600);
    assert!(slow_seqs.iter().copied().eq(1..=slow_seqs.len() as u64));
    // The others got everything, and still do.
    let frame = ClientFrame::Send {
        client_seq: 601,
        payload,
    };
    sender_write
        .write_all(&wire::encode(&frame))
        .await
        .expect("write");
    let fast_frames = tokio::time::timeout(Duration::from_secs(10), fast)
        .await
        .expect("the fast replica gets every message")
        .expect("reader");
    assert_eq!(seqs(&fast_frames), (1..=601).collect::<Vec<_>>());
    drop(sender_write);
    let _ = drain.await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_writes_what_is_queued_then_a_goodbye_to_every_replica() {
    let (handle, join, _) = spawn(DriverConfig::default());
    let (mut sender, _) = attach(&handle, 1, Role::Replica, false, 1 << 20);
    // One replica's pipe is full when the shutdown comes: its queue goes first, then the goodbye.
    let (mut behind, _) = attach(&handle, 2, Role::Replica, false, 300);
    let (mut idle, _) = attach(&handle, 3, Role::Replica, false, 1 << 20);
    tokio::time::sleep(Duration::from_millis(10)).await;
    send_many(&mut sender, 1, 50, 100).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    handle.shutdown().await;
    for (who, stream) in [
        ("sender", &mut sender),
        ("behind", &mut behind),
        ("idle", &mut idle),
    ] {
        let frames = read_all_frames(stream).await;
        assert_eq!(seqs(&frames), (1..=50).collect::<Vec<_>>(), "{who}");
        assert!(
            matches!(frames.last(), Some(ServerFrame::Goodbye { code, .. }) if *code == Code::SHUTTING_DOWN),
            "{who}: {:?}",
            frames.last()
        );
    }
    tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .expect("the session task ends")
        .expect("without panicking");
}

#[tokio::test(start_paused = true)]
async fn ticks_reach_every_idle_replica() {
    let (handle, _join, _) = spawn(DriverConfig::default());
    let mut replicas = Vec::new();
    for n in 1..=20 {
        replicas.push(attach(&handle, n, Role::Replica, false, 64 * 1024).0);
    }
    // Ten tick intervals of silence.
    tokio::time::sleep(Duration::from_millis(10 * 50 + 5)).await;
    handle.shutdown().await;
    let mut counts = Vec::new();
    for stream in &mut replicas {
        let frames = read_all_frames(stream).await;
        let times: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Tick { time } => Some(time.0),
                _ => None,
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
        counts.push(times.len());
    }
    assert!(
        counts.iter().all(|&c| c == counts[0] && c >= 9),
        "every replica got every tick: {counts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_is_written_at_once_not_at_the_next_wake() {
    let (handle, _join, _) = spawn(DriverConfig::default());
    let mut streams = Vec::new();
    for n in 1..=4 {
        streams.push(attach(&handle, n, Role::Replica, false, 64 * 1024).0);
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut readers: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let (r, w) = tokio::io::split(s);
            (isthmus_router::framed::FrameReader::new(r, 1 << 20), w)
        })
        .collect();
    // Bursts a tick interval apart, as a quiet island's are: each message reaches everyone
    // without waiting for anything else to wake the session (the clock is paused, so any wait
    // would show as time passing).
    for round in 0..5u64 {
        let sent = tokio::time::Instant::now();
        for (i, (_, w)) in readers.iter_mut().enumerate() {
            let frame = ClientFrame::Send {
                client_seq: round + 1,
                payload: Bytes::from(vec![i as u8; 10]),
            };
            w.write_all(&wire::encode(&frame)).await.expect("write");
        }
        let last = (round + 1) * 4;
        for (r, _) in &mut readers {
            loop {
                let frame = r.read::<ServerFrame>().await.expect("frame");
                if matches!(&frame, ServerFrame::Message(m) if m.seq.0 == last) {
                    break;
                }
            }
        }
        assert_eq!(sent.elapsed(), Duration::ZERO, "round {round}");
        tokio::time::sleep(Duration::from_millis(45)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_writes_stall_is_dropped_after_the_write_timeout() {
    let cfg = DriverConfig {
        write_timeout: Duration::from_secs(1),
        ..DriverConfig::default()
    };
    let (handle, _join, _) = spawn(cfg);
    let (sender, _) = attach(&handle, 1, Role::Replica, false, 1 << 20);
    let (mut sender_read, mut sender_write) = tokio::io::split(sender);
    // Reads nothing, ever; its queue stays far below the slow-consumer bound.
    let (mut stuck, _) = attach(&handle, 2, Role::Replica, false, 300);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let sent = tokio::time::Instant::now();
    for client_seq in 1..=20 {
        let frame = ClientFrame::Send {
            client_seq,
            payload: Bytes::from(vec![1u8; 100]),
        };
        sender_write
            .write_all(&wire::encode(&frame))
            .await
            .expect("write");
    }
    let mut r = isthmus_router::framed::FrameReader::new(&mut sender_read, 1 << 20);
    read_until_seq(&mut r, 20).await;
    // It is dropped once stalled for the write timeout, not before: the others hear that it
    // left, and its stream ends.
    let left = ReplicaId(Uuid::from_u128(2));
    let heard_left = async {
        loop {
            match r.read::<ServerFrame>().await.expect("frame") {
                ServerFrame::Presence { left: l, .. } if l.contains(&left) => break,
                ServerFrame::Message(m) => panic!("no more messages were sent: {m:?}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), heard_left)
        .await
        .expect("the stalled replica is dropped");
    let after = sent.elapsed();
    assert!(
        after >= Duration::from_secs(1) && after < Duration::from_millis(1100),
        "dropped {after:?} after it stalled"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stuck.read_to_end(&mut rest))
        .await
        .expect("the stalled stream ends")
        .expect("read");
}

#[tokio::test(start_paused = true)]
async fn timers_still_fire_while_a_replica_floods_the_session() {
    // A silent replica is dropped at its idle timeout even while another keeps the event
    // queue full (the select favours events, so its sleep alone would never be reached).
    let cfg = DriverConfig {
        session: SessionConfig {
            idle_timeout: Duration::from_secs(1),
            ..SessionConfig::default()
        },
        ..DriverConfig::default()
    };
    const FLOODERS: u64 = 4;
    let (handle, _join, _) = spawn(cfg);
    let (silent, _) = attach(&handle, 100, Role::Replica, false, 1 << 20);
    const N: u64 = 20_000;
    let mut floods = Vec::new();
    for n in 1..=FLOODERS {
        let (flooder, _) = attach(&handle, n, Role::Replica, false, 1 << 20);
        let (mut flood_read, mut flood_write) = tokio::io::split(flooder);
        tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while matches!(flood_read.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        floods.push(tokio::spawn(async move {
            let payload = Bytes::from_static(&[5u8; 16]);
            let mut out = Vec::new();
            for client_seq in 1..=N {
                let frame = ClientFrame::Send {
                    client_seq,
                    payload: payload.clone(),
                };
                out.extend_from_slice(&wire::encode(&frame));
                if out.len() >= 8 << 10 {
                    flood_write.write_all(&out).await.expect("write");
                    out.clear();
                }
            }
            flood_write.write_all(&out).await.expect("write");
        }));
    }
    // Give the flood a moment to fill the queue, then let the idle timeout pass at once.
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_secs(2)).await;
    let mut r = isthmus_router::framed::FrameReader::new(silent, 1 << 20);
    let mut last = 0;
    loop {
        match r.read::<ServerFrame>().await.expect("a whole frame") {
            ServerFrame::Message(m) => last = m.seq.0,
            ServerFrame::Goodbye { code, reason } => {
                assert_eq!(code, Code::IDLE_TIMEOUT, "{reason}");
                break;
            }
            _ => {}
        }
    }
    assert!(
        // What was stamped before the timeout is still delivered first (about 12,000 here);
        // a starved timer fires only where the flood lets the queue run dry (about 59,000).
        last < N * FLOODERS / 2,
        "the idle replica was dropped only once the flood let up (last seq {last})"
    );
    for f in floods {
        f.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_closed_connection_is_released_even_if_its_replica_keeps_it_open() {
    // The router stops the reader of a connection it is done with (by aborting its task), so
    // the stream is dropped after the goodbye: a replica that never closes its end cannot keep
    // a reader task and its socket alive.
    let (handle, _join, _) = spawn(DriverConfig::default());
    let (mut bad, _) = attach(&handle, 1, Role::Replica, false, 64 * 1024);
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Client seq 0 is a protocol violation: goodbye, then the router shuts its side down.
    send(
        &mut bad,
        &ClientFrame::Send {
            client_seq: 0,
            payload: Bytes::from_static(b"x"),
        },
    )
    .await;
    let frames = tokio::time::timeout(Duration::from_secs(5), read_all_frames(&mut bad))
        .await
        .expect("the stream ends after the goodbye");
    assert!(
        matches!(frames.last(), Some(ServerFrame::Goodbye { code, .. }) if *code == Code::PROTOCOL_VIOLATION),
        "ends with a goodbye: {:?}",
        frames.last()
    );
    // The replica keeps writing; once the router dropped both halves of the stream, writes fail.
    let ping = wire::encode(&ClientFrame::Ping { nonce: 1 });
    let released = async {
        loop {
            if bad.write_all(&ping).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), released)
        .await
        .expect("the router released the stream; a live reader would keep reading it");
}
