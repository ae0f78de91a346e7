//! The Croquet adapter fed by clients nobody wrote here: a script of connects, JSON text frames,
//! flushes, disconnects and time steps from a few connections. Never a panic, and every client
//! sees RECV seqs in one gapless order.
#![no_main]
use isthmus_croquet::adapter::{Action, AdapterConfig, CroquetSession, NoPersistence};
use isthmus_router::ids::ConnId;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let mut s = CroquetSession::new(
        "fuzzsession0123456789",
        AdapterConfig::default(),
        "timeline".into(),
        Box::new(NoPersistence),
    );
    // The last RECV seq each connection got, to check the order has no gaps.
    let mut last: HashMap<ConnId, u32> = HashMap::new();
    // Each script line: one byte of choice, then the rest of the line as text.
    for line in data.split(|&b| b == b'\n').take(256) {
        let Some((&op, rest)) = line.split_first() else {
            continue;
        };
        let conn = ConnId(u64::from(op & 3));
        match op >> 2 {
            0 => {
                last.remove(&conn);
                s.handle_connect(conn, true, now);
            }
            1 => {
                last.remove(&conn);
                s.handle_disconnect(conn, now);
            }
            2 => {
                now += Duration::from_millis(u64::from(rest.first().copied().unwrap_or(1)) * 7);
                s.handle_timeout(now);
            }
            3 => s.handle_flushed(conn, rest.len() * 64, now),
            _ => s.handle_text(conn, &String::from_utf8_lossy(rest), now),
        }
        while let Some(action) = s.poll_action() {
            if let Action::Send { conn, frame, .. } = action {
                let v = match serde_json::from_slice::<serde_json::Value>(&frame) {
                    Ok(v) => v,
                    Err(_) => {
                        // Client text echoed as it came: lone surrogates and numbers past an
                        // f64 are JSON that JSON.parse takes and serde's Value does not. It must
                        // still be well-formed JSON; the order cannot be followed through it.
                        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&frame) {
                            panic!("the adapter sent something that is not JSON ({e}): {frame:?}");
                        }
                        last.remove(&conn);
                        continue;
                    }
                };
                if v["action"] == "RECV" {
                    let seq = v["args"][1].as_u64().expect("a RECV carries its seq") as u32;
                    if let Some(prev) = last.insert(conn, seq) {
                        assert_eq!(seq, prev.wrapping_add(1), "a gap or a repeat in the order");
                    }
                }
                if v["action"] == "SYNC" {
                    last.remove(&conn);
                }
            }
        }
    }
});
