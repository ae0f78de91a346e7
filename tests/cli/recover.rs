//! A lone router killed with SIGKILL and restarted on the same port while its replicas send:
//! they re-create their island from the most advanced of them and carry on.

use crate::proc::Proc;
use crate::router::{spawn_ready, spawn_router};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

/// Lines each replica types, one every few milliseconds, across the kill and the restart.
const LINES: u64 = 100;
const REPLICAS: u64 = 3;

/// `[seq] name: text` lines of the chat's line mode, the last print of each seq winning (a
/// replica restored from a snapshot prints the chat again).
fn chat(lines: &[String]) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for l in lines {
        let Some(rest) = l.strip_prefix('[') else {
            continue;
        };
        let Some((seq, text)) = rest.split_once("] ") else {
            continue;
        };
        if let Ok(seq) = seq.parse::<u64>() {
            out.insert(seq, text.to_string());
        }
    }
    out
}

/// The `left at seq N, digest D` summary a line-mode replica writes on exit.
fn summary(err: &str) -> (u64, String) {
    let line = err
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("left at seq "))
        .unwrap_or_else(|| panic!("no summary in:\n{err}"));
    let (seq, digest) = line.split_once(", digest ").expect("seq and digest");
    (seq.parse().expect("seq"), digest.to_string())
}

#[test]
fn a_lone_router_killed_and_restarted_keeps_every_island_and_every_send() {
    let (mut router, addr) = spawn_router(&[]);
    let total = (LINES * REPLICAS).to_string();
    let common = |name: &str| -> Vec<String> {
        ["--exit-after-seq", &total, "--name", name]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let mut args: Vec<String> = ["island", "new", "atoll", "--router", &addr.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(common("r0"));
    let (creator, creator_in) = Proc::spawn_with_stdin(&args);
    let postcard = creator.next_line();
    assert!(postcard.starts_with("isthmus2:"), "{postcard}");
    let mut replicas = vec![creator];
    let mut stdins = vec![creator_in];
    for i in 1..REPLICAS {
        let mut args = vec!["join".to_string(), postcard.clone()];
        args.extend(common(&format!("r{i}")));
        let (p, stdin) = Proc::spawn_with_stdin(&args);
        replicas.push(p);
        stdins.push(stdin);
    }
    // Everyone types steadily, on through the kill and the restart (lines typed while the
    // router is away wait in the replica and go out once it is back). A closed stdin only
    // stops the typing; each replica exits once the whole order is applied.
    for (i, mut stdin) in stdins.into_iter().enumerate() {
        std::thread::spawn(move || {
            for k in 0..LINES {
                if writeln!(stdin, "r{i}-{k}").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
    // The kill lands in the middle of the traffic.
    let mut seen = Vec::new();
    loop {
        let line = replicas[0].next_line();
        let at = chat(std::slice::from_ref(&line)).keys().next().copied();
        seen.push(line);
        if at.is_some_and(|s| s >= LINES * REPLICAS / 4) {
            break;
        }
    }
    let _ = router.kill(); // SIGKILL: no goodbye, nothing saved
    let _ = router.wait();
    let port = addr.port().to_string();
    let (mut again, again_addr) = spawn_ready(&[
        "router",
        "--listen",
        "127.0.0.1",
        "--port",
        &port,
        "--no-beacon",
    ]);
    assert_eq!(again_addr, addr);
    let mut digests = Vec::new();
    let mut reference: Option<BTreeMap<u64, String>> = None;
    for (i, p) in replicas.into_iter().enumerate() {
        let (status, mut lines, err) = p.finish();
        if std::env::var_os("RECOVER_SHOW").is_some() {
            eprintln!("replica {i}:\n{err}");
        }
        assert!(status.success(), "replica {i} ({status}): {err}");
        assert!(!err.contains("session is lost"), "replica {i}: {err}");
        assert!(
            err.contains("reconnected"),
            "replica {i} noticed the kill: {err}"
        );
        if i == 0 {
            seen.append(&mut lines);
            lines = seen.clone();
        }
        let (last, digest) = summary(&err);
        assert_eq!(last, LINES * REPLICAS, "replica {i}");
        digests.push(digest);
        let c = chat(&lines);
        if reference.is_none() || c.len() > reference.as_ref().map_or(0, BTreeMap::len) {
            reference = Some(c);
        }
    }
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "identical digests: {digests:?}"
    );
    // One replica printed the whole order: no gap, every typed line exactly once.
    let reference = reference.expect("a transcript");
    let seqs: Vec<u64> = reference.keys().copied().collect();
    assert_eq!(seqs, (1..=LINES * REPLICAS).collect::<Vec<_>>(), "no gap");
    let mut texts: Vec<String> = reference
        .values()
        .map(|t| t.split_once(": ").map_or(t.clone(), |(_, x)| x.to_string()))
        .collect();
    texts.sort();
    let mut expected: Vec<String> = (0..REPLICAS)
        .flat_map(|i| (0..LINES).map(move |k| format!("r{i}-{k}")))
        .collect();
    expected.sort();
    assert_eq!(texts, expected, "every line typed stamped exactly once");
    let _ = again.kill();
    let _ = again.wait();
}
