//! What a sniffer on the path sees of a private island: a real packet capture (tcpdump on
//! loopback) of two replicas chatting through the router. It must hold no line they sent, no
//! secret, and no hello that can be used again.

use crate::proc::Proc;
use crate::router::spawn_router;
use bytes::BytesMut;
use isthmus_contact::Postcard;
use isthmus_router::wire::{self, Code, ServerFrame};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// tcpdump needs root (packet capture on `lo`); without it the test skips loudly, and under
/// `.ci/run` (which sets the variable) a skip is a failure.
fn capture_available(test: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tool = Command::new("tcpdump")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if root && tool {
        return true;
    }
    isthmus_tests::netns::skip::<()>(&format!(
        "SKIPPED {test}: needs root and tcpdump to capture loopback traffic (root: {root}, tcpdump: {tool}); .ci/run installs tcpdump and runs as root"
    ));
    false
}

struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(port: u16, file: std::path::PathBuf) -> Capture {
        let mut child = Command::new("tcpdump")
            // Immediate mode: packets reach the file as they come, not when a buffer fills.
            .args(["-i", "lo", "--immediate-mode", "-U", "-s", "0", "-n", "-w"])
            .arg(&file)
            .arg(format!("tcp port {port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        // tcpdump says "listening on lo" once the capture is armed.
        let mut err = child.stderr.take().expect("stderr");
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        let deadline = Instant::now() + Duration::from_secs(20);
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            match err.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => panic!("tcpdump ended early: {}", String::from_utf8_lossy(&seen)),
            }
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Capture { child, file }
    }

    /// Stops the capture and returns each direction's byte stream, keyed by (from, to). A last
    /// marker sent to the router's port shows when everything before it is in the file.
    fn finish(mut self, router: SocketAddr) -> HashMap<(SocketAddr, SocketAddr), Vec<u8>> {
        let marker = b"END-OF-CAPTURE-MARKER";
        if let Ok(mut s) = TcpStream::connect(router) {
            let _ = s.write_all(marker);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read(&self.file).is_ok_and(|b| contains(&b, marker)) {
            assert!(
                Instant::now() < deadline,
                "the capture never saw its end marker"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let bytes = std::fs::read(&self.file).expect("read capture");
        streams(&bytes)
    }
}

/// Reassembles TCP payloads per direction from a pcap file (Ethernet, Linux cooked v1/v2).
fn streams(pcap: &[u8]) -> HashMap<(SocketAddr, SocketAddr), Vec<u8>> {
    assert!(pcap.len() >= 24, "capture too short");
    let le = pcap[..4] == [0xd4, 0xc3, 0xb2, 0xa1] || pcap[..4] == [0x4d, 0x3c, 0xb2, 0xa1];
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link = u32_at(pcap, 20);
    let link_len = match link {
        1 => 14,
        113 => 16,
        276 => 20,
        other => panic!("unexpected link type {other} in the capture"),
    };
    let mut segments: HashMap<(SocketAddr, SocketAddr), BTreeMap<u32, Vec<u8>>> = HashMap::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let caplen = u32_at(pcap, at + 8) as usize;
        let pkt = &pcap[at + 16..(at + 16 + caplen).min(pcap.len())];
        at += 16 + caplen;
        let Some(ip) = pkt.get(link_len..) else {
            continue;
        };
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let Some(tcp) = ip.get(ihl..total) else {
            continue;
        };
        if tcp.len() < 20 {
            continue;
        }
        let src = SocketAddr::from((
            [ip[12], ip[13], ip[14], ip[15]],
            u16::from_be_bytes([tcp[0], tcp[1]]),
        ));
        let dst = SocketAddr::from((
            [ip[16], ip[17], ip[18], ip[19]],
            u16::from_be_bytes([tcp[2], tcp[3]]),
        ));
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let off = usize::from(tcp[12] >> 4) * 4;
        let Some(data) = tcp.get(off..) else { continue };
        if !data.is_empty() {
            segments
                .entry((src, dst))
                .or_default()
                .insert(seq, data.to_vec());
        }
    }
    segments
        .into_iter()
        .map(|(flow, segs)| {
            let mut out = Vec::new();
            let mut next: Option<u32> = None;
            for (seq, data) in segs {
                let skip = next.map_or(0, |n| n.wrapping_sub(seq) as usize);
                if skip < data.len() {
                    out.extend_from_slice(&data[skip..]);
                    next = Some(seq.wrapping_add(data.len() as u32));
                }
            }
            (flow, out)
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_capture_of_a_private_island_holds_no_plaintext_secret_or_reusable_hello() {
    if !capture_available("capture_of_a_private_island") {
        return;
    }
    let data = tempdir("capture");
    let (mut router, addr) = spawn_router(&[]);
    let capture = Capture::start(addr.port(), data.join("lo.pcap"));

    let marker_a = "sniff-me-if-you-can 7f3a9";
    let marker_b = "the second secret line 51c0e";
    let router_arg = addr.to_string();
    let mut cmd = crate::proc::isthmus();
    cmd.env("ISTHMUS_DATA_DIR", &data).args([
        "island",
        "new",
        "capture",
        "--router",
        &router_arg,
        "--private",
        "--json",
        "--send",
        marker_a,
        "--exit-after-seq",
        "2",
    ]);
    let creator = Proc::from_command(cmd);
    let postcard_text = creator.next_line();
    let postcard: Postcard = postcard_text.parse().expect("postcard");
    let mut cmd = crate::proc::isthmus();
    cmd.env("ISTHMUS_DATA_DIR", &data).args([
        "join",
        &postcard_text,
        "--json",
        "--send",
        marker_b,
        "--exit-after-seq",
        "2",
    ]);
    let joiner = Proc::from_command(cmd);
    let (status, lines, err) = joiner.finish();
    assert!(status.success(), "joiner failed: {err}");
    assert!(
        lines.iter().any(|l| l.contains(marker_a)) && lines.iter().any(|l| l.contains(marker_b)),
        "the joiner did not see both lines in the clear: {lines:?}"
    );
    let (status, _, err) = creator.finish();
    assert!(status.success(), "creator failed: {err}");
    let flows = capture.finish(addr);
    assert!(!flows.is_empty(), "the capture holds no traffic");

    // Every secret either side holds, and what is derived from them for sealing.
    let admin_file = std::fs::read_dir(data.join("islands"))
        .expect("admin capability kept in the data dir")
        .filter_map(Result::ok)
        .next()
        .expect("one admin file");
    let admin: Postcard = std::fs::read_to_string(admin_file.path())
        .expect("read admin file")
        .trim()
        .parse()
        .expect("admin postcard");
    let session = postcard.contact.session;
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let mut cap = Some(admin.capability);
    while let Some(c) = cap {
        secrets.push(c.secret().to_vec());
        cap = c.weaker();
    }
    secrets.push(
        admin
            .capability
            .payload_key(session)
            .expect("payload key")
            .to_vec(),
    );
    for ((from, to), bytes) in &flows {
        for marker in [marker_a, marker_b] {
            assert!(
                !contains(bytes, marker.as_bytes()),
                "{from} -> {to} carries {marker:?} in the clear"
            );
        }
        for s in &secrets {
            assert!(!contains(bytes, s), "{from} -> {to} carries a secret");
        }
    }

    // Replay every captured hello on a fresh connection: each must be refused.
    let hellos: Vec<&Vec<u8>> = flows
        .iter()
        .filter(|((_, to), b)| {
            *to == addr && b.len() > wire::PREAMBLE_LEN + 4 && b[..8] == wire::MAGIC
        })
        .map(|(_, b)| b)
        .collect();
    assert!(hellos.len() >= 2, "expected both replicas' connections");
    for stream in hellos {
        let len = u32::from_be_bytes(
            stream[wire::PREAMBLE_LEN..wire::PREAMBLE_LEN + 4]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        let replay = &stream[..wire::PREAMBLE_LEN + 4 + len];
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(replay).expect("replay");
        let mut pre = [0u8; wire::ROUTER_PREAMBLE_LEN];
        s.read_exact(&mut pre).expect("router preamble");
        let mut buf = BytesMut::new();
        let frame = loop {
            if let Some(f) = wire::decode::<ServerFrame>(&mut buf, wire::DEFAULT_MAX_FRAME_BYTES)
                .expect("a well-formed answer")
            {
                break f;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).expect("read answer");
            assert!(n > 0, "the router closed without refusing the replay");
            buf.extend_from_slice(&chunk[..n]);
        };
        match frame {
            ServerFrame::Refuse { code, .. } => assert_eq!(code, Code::BAD_CREDENTIALS),
            other => panic!("a replayed hello was not refused: {other:?}"),
        }
    }
    let _ = router.kill();
    let _ = router.wait();
    let _ = std::fs::remove_dir_all(&data);
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("isthmus-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
