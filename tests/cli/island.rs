use crate::proc::{isthmus, test_data_dir, Proc, BIN, PATIENCE};
use crate::router::spawn_router;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;

struct Transcript {
    messages: BTreeMap<u64, String>,
    first: u64,
    last_seq: u64,
    digest: String,
}

fn transcript(lines: &[String]) -> Transcript {
    let mut messages = BTreeMap::new();
    let mut order = Vec::new();
    let mut summary = None;
    for line in lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(seq) = v.get("seq").and_then(Value::as_u64) {
            let text = v["text"].as_str().expect("text").to_string();
            assert!(v["time_us"].is_u64() && v["from"].is_string(), "{line}");
            assert!(
                messages.insert(seq, text).is_none(),
                "seq {seq} printed twice"
            );
            order.push(seq);
        } else {
            summary = Some((
                v["last_seq"].as_u64().expect("last_seq"),
                v["digest"].as_str().expect("digest").to_string(),
            ));
        }
    }
    let first = order.first().copied().unwrap_or(0);
    let expect: Vec<u64> = (first..first + order.len() as u64).collect();
    assert_eq!(order, expect, "seqs printed contiguously in order");
    let (last_seq, digest) = summary.expect("a summary line on exit");
    Transcript {
        messages,
        first,
        last_seq,
        digest,
    }
}

#[test]
fn creator_joiners_and_a_late_joiner_end_with_one_history_and_one_digest() {
    let (mut router, addr) = spawn_router(&[]);
    let total = 150u64;
    let n = total.to_string();
    let creator = island_new("harbour", addr, &["--json", "--exit-after-seq", &n]);
    let postcard = creator.next_line();
    assert!(postcard.starts_with("isthmus2:"), "{postcard}");
    let joiners: Vec<Proc> = (0..3)
        .map(|j| {
            let mut args = vec!["join".to_string(), postcard.clone()];
            for k in 0..50 {
                args.push("--send".into());
                args.push(format!("j{j}-{k}"));
            }
            args.extend(["--json".into(), "--exit-after-seq".into(), n.clone()]);
            args.extend(["--name".into(), format!("joiner{j}")]);
            Proc::spawn(&args)
        })
        .collect();
    // The late joiner arrives once the creator has seen a third of the messages.
    loop {
        let line = creator.next_line();
        let v: Value = serde_json::from_str(&line).expect("json");
        if v["seq"].as_u64().is_some_and(|s| s >= total / 3) {
            break;
        }
    }
    let late = Proc::spawn(&[
        "join".into(),
        postcard.clone(),
        "--json".into(),
        "--exit-after-seq".into(),
        n.clone(),
    ]);
    let mut all = Vec::new();
    let (status, lines, err) = creator.finish();
    assert!(status.success(), "creator: {err}");
    // The creator's early lines were consumed above; its summary is among the rest.
    let creator_t = {
        let keep: Vec<String> = lines;
        let summary_only = keep.iter().all(|l| !l.contains("\"seq\""));
        if summary_only {
            None
        } else {
            Some(transcript(&keep))
        }
    };
    for p in joiners.into_iter().chain([late]) {
        let (status, lines, err) = p.finish();
        assert!(status.success(), "replica failed: {err}");
        all.push(transcript(&lines));
    }
    let reference = &all[0];
    assert_eq!(reference.last_seq, total);
    assert_eq!(
        reference.messages.len() as u64,
        total,
        "a joiner saw everything"
    );
    for t in all.iter().chain(creator_t.iter()) {
        assert_eq!(t.last_seq, total);
        assert_eq!(
            t.digest, reference.digest,
            "every replica ends in the same state"
        );
        for (seq, text) in &t.messages {
            assert_eq!(reference.messages.get(seq), Some(text), "seq {seq} differs");
        }
    }
    // Every line sent was stamped exactly once.
    let mut texts: Vec<&String> = reference.messages.values().collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len() as u64, total);
    let _ = all.last().map(|late| late.first);
    let _ = router.kill();
    let _ = router.wait();
}

#[test]
fn join_strings_that_cannot_work_fail_with_one_clear_line() {
    // Malformed: exit 2.
    let out = Command::new(BIN)
        .args(["join", "not-a-postcard"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A damaged character: exit 2, and it says so.
    let (mut router, addr) = spawn_router(&[]);
    let creator = island_new("pier", addr, &["--json"]);
    let postcard = creator.next_line();
    let mut damaged: Vec<char> = postcard.chars().collect();
    let i = damaged.len() / 2;
    damaged[i] = if damaged[i] == 'a' { 'b' } else { 'a' };
    let damaged: String = damaged.into_iter().collect();
    let out = Command::new(BIN)
        .args(["join", &damaged])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));

    // A postcard made by an older isthmus: exit 2, and it says to ask for a new one.
    let out = Command::new(BIN)
        .args([
            "join",
            "isthmus1:aebagbafaydqqcikbmga2dqpcaireeyuculbogazdinryhi6d4qa",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("older isthmus (protocol 1)"), "{err}");

    // Another secret with this router's address: the session id is the hash of the keys, so
    // it is another island, one this router does not have. Refused, non-zero, one line.
    use isthmus_contact::Postcard;
    use isthmus_router::auth::Capability;
    let card: Postcard = postcard.parse().expect("postcard");
    let stranger = Postcard::for_new_island(card.contact.clone(), Capability::new_island())
        .expect("postcard")
        .participant()
        .expect("participant");
    assert_ne!(stranger.session(), card.session());
    let out = isthmus()
        .args(["join", &stranger.to_string()])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(3),
        "an island the router lacks is a lost session"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("does not have this island"), "{err}");

    // An observer asked to send: exit 1, one plain line, before anything is sent.
    let observer = card.observer().expect("observer").to_string();
    let out = isthmus()
        .args(["join", &observer, "--send", "hi"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("observers cannot send"), "{err}");

    // An unreachable router: non-zero, one line naming the address.
    let _ = router.kill();
    let _ = router.wait();
    let out = Command::new(BIN)
        .args(["join", &postcard])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the router"), "{err}");
    let (_, _, _) = creator.finish_killed();
}

/// A terminal in tmux running a login-free shell: what a person types and sees.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start(test: &str) -> Option<Tmux> {
        let have = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            return isthmus_tests::netns::skip(&format!(
                "SKIPPED {test}: needs tmux to play a person at a terminal (.ci/run installs it)"
            ));
        }
        let session = format!("isthmus-{}-{test}", std::process::id());
        let status = Command::new("tmux")
            .args(["new-session", "-d", "-s", &session, "-x", "120", "-y", "32"])
            .args(["env", "PS1=prompt$ ", "bash", "--norc", "--noprofile", "-i"])
            .status()
            .expect("tmux");
        assert!(status.success(), "tmux new-session");
        Some(Tmux { session })
    }

    fn keys(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// Types a line of text literally, then Enter.
    fn type_line(&self, text: &str) {
        self.keys(&["-l", text]);
        self.keys(&["Enter"]);
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows everything in `want`.
    fn wait_for(&self, want: &[&str]) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let screen = self.screen();
            if want.iter().all(|w| screen.contains(w)) {
                return screen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the terminal never showed {want:?}; it shows:\n{screen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}

#[test]
fn on_a_terminal_the_chat_shows_messages_members_and_status_and_leaves_cleanly() {
    let Some(term) = Tmux::start("chat-tui") else {
        return;
    };
    let (mut router, addr) = spawn_router(&[]);
    let data = test_data_dir();
    let prefs = crate::proc::no_prefs();
    let env = format!(
        "ISTHMUS_PREFS={} ISTHMUS_DATA_DIR={}",
        prefs.display(),
        data.display()
    );
    term.type_line(&format!(
        "{env} {BIN} island new den --router {addr} --name ada"
    ));
    term.wait_for(&["members (1)", "ada (you)", "seq 0", "connected"]);
    // The admin postcard the creator kept lets this test find the island.
    let newest = std::fs::read_dir(data.join("islands"))
        .expect("admin postcards kept")
        .filter_map(Result::ok)
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .expect("one admin postcard");
    let admin = std::fs::read_to_string(newest.path()).expect("read admin postcard");
    let joiner = Proc::spawn(&[
        "join".into(),
        admin.trim().to_string(),
        "--name".into(),
        "bob".into(),
        "--json".into(),
        "--exit-after-seq".into(),
        "1".into(),
    ]);
    term.type_line("ahoy there");
    let (status, lines, err) = joiner.finish();
    assert!(status.success(), "{err}");
    assert!(
        lines[0].contains("\"name\":\"ada\"") && lines[0].contains("\"text\":\"ahoy there\""),
        "{lines:?}"
    );
    let screen = term.wait_for(&["[1] ada: ahoy there", "seq 1"]);
    assert!(
        !screen.contains("digest 000000000000") && !screen.contains("digest -"),
        "the status line follows the island's digest:\n{screen}"
    );

    // Ctrl-C leaves, and the shell gets back every key typed after it.
    term.keys(&["C-c"]);
    term.wait_for(&["left at seq 1"]);
    term.type_line("echo after-ctrl-c");
    term.wait_for(&["after-ctrl-c\nprompt$"]);

    // A joiner gets the same view; Ctrl-D on an empty line leaves too.
    term.type_line(&format!("{env} {BIN} join {} --name cy", admin.trim()));
    term.wait_for(&["[1] ada: ahoy there", "cy (you)", "joined island"]);
    term.keys(&["C-d"]);
    term.wait_for(&["left at seq 1"]);
    term.type_line("echo after-ctrl-d");
    term.wait_for(&["after-ctrl-d\nprompt$"]);
    let _ = router.kill();
    let _ = router.wait();
}

/// `isthmus island new NAME --router ADDR EXTRA...`, the creator most tests start with.
fn island_new(name: &str, addr: std::net::SocketAddr, extra: &[&str]) -> Proc {
    let router = addr.to_string();
    let mut args = vec!["island", "new", name, "--router", &router];
    args.extend_from_slice(extra);
    Proc::spawn(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
}

fn run_ok(args: &[&str]) -> String {
    let out = isthmus().args(args).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "isthmus {args:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn postcards_derive_down_and_show_their_role_but_never_a_secret() {
    use isthmus_contact::Postcard;
    use isthmus_router::auth::Capability;
    use isthmus_router::wire::Role;
    let admin = Postcard::for_new_island(
        isthmus_contact::ContactPoint::new(
            isthmus_router::ids::SessionId::random(),
            "atoll",
            vec!["127.0.0.1:7470".parse().expect("addr")],
        ),
        Capability::new_island(),
    )
    .expect("postcard");
    let participant = admin.participant().expect("participant").to_string();

    let observer = run_ok(&["postcard", "observer", &participant]);
    let observer = observer.trim();
    let card: Postcard = observer.parse().expect("an observer postcard");
    assert_eq!(card.role(), Role::Observer);
    assert_eq!(card.session(), admin.session());
    // An observer's observer postcard is itself; nothing derives upwards.
    assert_eq!(run_ok(&["postcard", "observer", observer]).trim(), observer);

    for (text, role) in [
        (admin.to_string(), "admin"),
        (participant.clone(), "participant"),
        (observer.to_string(), "observer"),
    ] {
        let shown = run_ok(&["postcard", "show", &text, "--json"]);
        let v: Value = serde_json::from_str(shown.trim()).expect("json");
        assert_eq!(v["role"], role, "{shown}");
        assert_eq!(v["session"], admin.session().to_string());
        assert!(v.get("secret").is_none(), "{shown}");
        let plain = run_ok(&["postcard", "show", &text]);
        assert!(plain.contains(&format!("role:        {role}")), "{plain}");
        assert!(!plain.to_lowercase().contains("secret"), "{plain}");
        // No run of the postcard's body (where the secret is) appears in either form.
        let body = &text["isthmus2:".len()..];
        for chunk in body.as_bytes().chunks(10).filter(|c| c.len() == 10) {
            let chunk = std::str::from_utf8(chunk).expect("ascii");
            assert!(!shown.contains(chunk) && !plain.contains(chunk));
        }
    }

    // A damaged postcard names the position in what was pasted.
    let mut damaged: Vec<char> = participant.chars().collect();
    damaged[20] = '0';
    let damaged: String = damaged.into_iter().collect();
    let out = isthmus()
        .args(["postcard", "observer", &damaged])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("character 21"), "{err}");
}

#[test]
fn the_admin_postcard_is_kept_and_ticks_kicks_and_closes_the_island() {
    use isthmus_contact::Postcard;
    use isthmus_router::wire::Role;
    let (mut router, addr) = spawn_router(&[]);
    let creator = island_new("cove", addr, &["--json"]);
    let postcard = creator.next_line();
    let card: Postcard = postcard.parse().expect("postcard");
    assert_eq!(
        card.role(),
        Role::Replica,
        "the printed postcard is a participant's"
    );
    let session = card.session().to_string();

    // The admin postcard is kept, readable by this user only.
    let path = test_data_dir()
        .join("islands")
        .join(format!("{session}.admin"));
    let deadline = std::time::Instant::now() + PATIENCE;
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let admin_text = run_ok(&["postcard", "admin", &session]);
    let admin: Postcard = admin_text.trim().parse().expect("admin postcard");
    assert_eq!(admin.role(), Role::Admin);
    assert_eq!(admin.session(), card.session());
    assert_eq!(admin.participant().expect("participant"), card);

    // Admin commands need the admin capability: the participant postcard is refused (exit 2).
    let out = isthmus()
        .args(["island", "close", &postcard])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin postcard"), "{err}");
    // A session id with no kept admin postcard: exit 2, and it says what to give instead.
    let out = isthmus()
        .args(["island", "close", &uuid::Uuid::new_v4().to_string()])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));

    // Tick by session id (the kept postcard); the router's answer is printed.
    let said = run_ok(&["island", "tick", &session, "20"]);
    assert!(!said.trim().is_empty());

    // Kick a joiner, named by the id its own message carries; it ends with exit 3.
    let joiner = Proc::spawn(&[
        "join".into(),
        postcard.clone(),
        "--send".into(),
        "here".into(),
        "--json".into(),
    ]);
    let joiner_id = loop {
        let v: Value = serde_json::from_str(&joiner.next_line()).expect("json");
        if v["text"] == "here" {
            break v["from"].as_str().expect("from").to_string();
        }
    };
    run_ok(&["island", "kick", admin_text.trim(), &joiner_id]);
    let (status, _, err) = joiner.finish();
    assert_eq!(status.code(), Some(3), "{err}");

    // Close: the creator is told and ends too; the island is gone from the router.
    run_ok(&["island", "close", &session]);
    let (status, _, err) = creator.finish();
    assert_eq!(status.code(), Some(3), "{err}");
    let out = isthmus().args(["join", &postcard]).output().expect("run");
    assert!(!out.status.success());
    let _ = router.kill();
    let _ = router.wait();
}

#[test]
fn json_output_closed_early_ends_quietly_and_sigterm_prints_the_summary() {
    use std::io::{BufRead, BufReader};
    let (mut router, addr) = spawn_router(&[]);
    let mut args = vec![
        "island".to_string(),
        "new".into(),
        "brook".into(),
        "--router".into(),
        addr.to_string(),
        "--json".into(),
    ];
    for k in 0..5 {
        args.extend(["--send".into(), format!("line {k}")]);
    }
    // `| head -2`: read two lines, then close the pipe.
    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut child = isthmus()
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let mut lines = BufReader::new(reader).lines();
    let postcard = lines.next().expect("postcard").expect("read");
    lines.next().expect("a line").expect("read");
    drop(lines);
    // The next message the creator prints meets the closed pipe; a joiner sends one.
    let joiner = Proc::spawn(&[
        "join".into(),
        postcard,
        "--json".into(),
        "--name".into(),
        "dee".into(),
        "--send".into(),
        "after the reader left".into(),
    ]);
    let first: Value = serde_json::from_str(&joiner.next_line()).expect("json");
    assert_eq!(first["text"], "line 0", "{first}");
    assert!(
        first["name"].as_str().is_some_and(|n| !n.is_empty()),
        "JSON lines carry the sender's name: {first}"
    );
    while !joiner.next_line().contains("after the reader left") {}
    let status = crate::proc::exits_in_time(
        &mut child,
        "the creator kept running with nobody reading its output",
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // SIGTERM on a --json replica ends with the summary line, like Ctrl-C.
    joiner.signal("TERM");
    let (status, lines, err) = joiner.finish();
    assert!(status.success(), "{err}");
    let last: Value = serde_json::from_str(lines.last().expect("a summary")).expect("json");
    assert!(
        last["last_seq"].as_u64().is_some() && last["digest"].is_string(),
        "{lines:?}"
    );
    let _ = router.kill();
    let _ = router.wait();
}

#[test]
fn sends_on_an_island_already_past_the_stop_seq_are_stamped_before_exit() {
    let (mut router, addr) = spawn_router(&[]);
    let creator = island_new(
        "cove",
        addr,
        &[
            "--json", "--send", "one", "--send", "two", "--send", "three",
        ],
    );
    let postcard = creator.next_line();
    for _ in 0..3 {
        creator.next_line();
    }
    let joiner = Proc::spawn(&[
        "join".into(),
        postcard,
        "--json".into(),
        "--send".into(),
        "was this sent?".into(),
        "--exit-after-seq".into(),
        "1".into(),
    ]);
    let (status, lines, err) = joiner.finish();
    assert!(status.success(), "{err}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"text\":\"was this sent?\"")),
        "the send was stamped before the replica exited: {lines:?}"
    );
    let last: Value = serde_json::from_str(lines.last().expect("summary")).expect("json");
    assert_eq!(last["last_seq"], 4, "{lines:?}");
    let _ = creator.finish_killed();
    let _ = router.kill();
    let _ = router.wait();
}

#[test]
fn a_replica_whose_router_is_gone_says_each_retry_and_gives_up() {
    let (mut router, addr) = spawn_router(&[]);
    let replica = island_new("shoal", addr, &["--json", "--give-up-after", "3"]);
    replica.next_line();
    // The router dies without a goodbye and never comes back.
    let _ = router.kill();
    let _ = router.wait();
    replica.wait_stderr(&format!("reconnecting to {addr} in "), 2);
    let (status, _, err) = replica.finish();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("(attempt 1)") && err.contains("(attempt 2)"),
        "{err}"
    );
    assert!(err.contains("gave up after 3 s"), "{err}");
}

#[test]
fn a_router_that_shuts_down_ends_its_islands_for_its_replicas_at_once() {
    let (router, addr) = spawn_router(&[]);
    let replica = island_new("dune", addr, &["--json"]);
    replica.next_line();
    crate::router::sigterm(&router);
    // Not minutes of reconnecting to a router whose islands are gone: exit 3 right away.
    let (status, _, err) = replica.finish();
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("the router shut down"), "{err}");
    assert!(!err.contains("reconnecting"), "{err}");
}

#[test]
fn head_1_on_a_quiet_island_returns_with_the_postcard() {
    use std::io::{BufRead, BufReader};
    let (mut router, addr) = spawn_router(&[]);
    // P=$(isthmus island new ... | head -1): nothing more is ever written, yet it must end.
    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut child = isthmus()
        .args(["island", "new", "lake", "--router", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let postcard = BufReader::new(reader)
        .lines()
        .next()
        .expect("a line")
        .expect("read");
    assert!(postcard.starts_with("isthmus2:"), "{postcard}");
    let status = crate::proc::exits_in_time(&mut child, "it kept running after its reader left");
    assert_eq!(status.code(), Some(0));
    let _ = router.kill();
    let _ = router.wait();
}

#[test]
fn a_piped_line_too_long_to_send_is_skipped_and_the_next_lines_still_go() {
    use std::io::Write;
    let (mut router, addr) = spawn_router(&[]);
    let creator = island_new("reef", addr, &["--json"]);
    let postcard = creator.next_line();
    let mut piper = isthmus()
        .args(["join", &postcard, "--name", "piper"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let mut typing = piper.stdin.take().expect("stdin");
    writeln!(typing, "{}", "a".repeat(300_000)).expect("write");
    writeln!(typing, "small after").expect("write");
    let line: Value = serde_json::from_str(&creator.next_line()).expect("json");
    assert_eq!(line["text"], "small after", "{line}");
    let _ = piper.kill();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut piper.stderr.take().expect("stderr"), &mut err);
    assert!(
        err.contains("not sent: a line of 300000 bytes is too long"),
        "{err}"
    );
    let _ = piper.wait();
    let _ = creator.finish_killed();
    let _ = router.kill();
    let _ = router.wait();
}
