//! Discovery and joining across a LAN made of network namespaces: host A runs the router and
//! creates islands, host B finds them by broadcast and joins.

use crate::proc::in_netns as in_ns;
use isthmus_tests::netns::NetLab;
use serde_json::Value;
use std::time::{Duration, Instant};

const A_IP: &str = "10.201.0.1";
const B_IP: &str = "10.201.0.2";

pub(crate) fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The island `name` among those `discover --json` heard (`err`: its stderr, for the failure).
pub(crate) fn heard_island(heard: &[Value], name: &str, err: &str) -> Value {
    heard
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not heard: {heard:?} {err}"))
        .clone()
}

#[test]
fn islands_are_found_by_broadcast_and_joined_from_another_host() {
    let Some(mut lab) = NetLab::new("islands_are_found_by_broadcast_and_joined_from_another_host")
    else {
        return;
    };
    let a = lab.host("a");
    let b = lab.host("b");
    lab.link(&a, &format!("{A_IP}/24"), &b, &format!("{B_IP}/24"));

    let router = in_ns(
        &lab,
        &a,
        &[
            "router",
            "--beacon-interval-ms",
            "500",
            "--linger-ms",
            "500",
        ],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    let router_addr = format!("{A_IP}:7470");

    let open = in_ns(
        &lab,
        &a,
        &[
            "island",
            "new",
            "lagoon",
            "--router",
            &router_addr,
            "--json",
        ],
    );
    let open_card = open.next_line();
    let private = in_ns(
        &lab,
        &a,
        &[
            "island",
            "new",
            "grotto",
            "--private",
            "--router",
            &router_addr,
            "--json",
        ],
    );
    let private_card = private.next_line();

    // The creator's postcard is a participant's and carries the router's LAN address.
    assert!(open_card.starts_with("isthmus2:"), "{open_card}");
    let shown = in_ns(&lab, &a, &["postcard", "show", &open_card, "--json"]);
    let (status, lines, err) = shown.finish();
    assert!(status.success(), "{err}");
    let v = &json_lines(&lines)[0];
    assert_eq!(v["island"], "lagoon");
    assert_eq!(v["role"], "participant");
    assert_eq!(v["internal"][0], router_addr.as_str());
    assert!(v.get("secret").is_none(), "no secret, not even a part: {v}");
    assert!(
        !lines[0].contains(&open_card[12..40]),
        "the postcard's body is not printed"
    );

    // Host B hears both within 5 s, with A's LAN address.
    let started = Instant::now();
    let (status, lines, err) = in_ns(&lab, &b, &["discover", "--timeout", "5", "--json"]).finish();
    assert!(status.success(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let heard = json_lines(&lines);
    let find = |name: &str| heard_island(&heard, name, &err);
    let lagoon = find("lagoon");
    assert_eq!(lagoon["router"], router_addr.as_str());
    assert_eq!(lagoon["open"], true);
    assert_eq!(find("grotto")["open"], false);

    // Join the open island by name from B: send and receive.
    let (status, lines, err) = in_ns(
        &lab,
        &b,
        &[
            "join",
            "--discover",
            "lagoon",
            "--send",
            "hello from b",
            "--json",
            "--exit-after-seq",
            "1",
        ],
    )
    .finish();
    assert!(status.success(), "{err}");
    let got = json_lines(&lines);
    assert_eq!(got[0]["seq"], 1);
    assert_eq!(got[0]["text"], "hello from b");
    assert!(
        open.next_line().contains("hello from b"),
        "the creator got it too"
    );

    // A LAN-open island's postcard can be fetched from the LAN, ready to paste: a participant
    // postcard of the same island (the beacon's secret is checked against the session).
    let (status, lines, err) = in_ns(&lab, &b, &["postcard", "--discover", "lagoon"]).finish();
    assert!(status.success(), "{err}");
    assert!(lines[0].starts_with("isthmus2:"));
    let heard_card: isthmus_contact::Postcard = lines[0].parse().expect("reads");
    let open_parsed: isthmus_contact::Postcard = open_card.parse().expect("reads");
    assert_eq!(heard_card.session(), open_parsed.session());
    assert_eq!(heard_card.role(), isthmus_router::wire::Role::Replica);

    // An observer postcard of the open island watches: it sees what was said, and may not send.
    let (status, lines, err) = in_ns(&lab, &b, &["postcard", "observer", &open_card]).finish();
    assert!(status.success(), "{err}");
    let observer_card = lines[0].clone();
    let (status, lines, err) = in_ns(
        &lab,
        &b,
        &["join", &observer_card, "--json", "--exit-after-seq", "1"],
    )
    .finish();
    assert!(status.success(), "{err}");
    assert_eq!(json_lines(&lines)[0]["text"], "hello from b");

    // The private island is listed but not joinable without its postcard...
    let (status, _, err) = in_ns(&lab, &b, &["join", "--discover", "grotto"]).finish();
    assert!(!status.success());
    assert!(err.contains("private"), "{err}");
    // ...and joinable with it.
    let (status, lines, err) = in_ns(
        &lab,
        &b,
        &[
            "join",
            &private_card,
            "--send",
            "psst",
            "--json",
            "--exit-after-seq",
            "1",
        ],
    )
    .finish();
    assert!(status.success(), "{err}");
    assert_eq!(json_lines(&lines)[0]["text"], "psst");

    // An island that lingers out disappears from a listener within three beacon intervals.
    let watch = in_ns(
        &lab,
        &b,
        &["discover", "--watch", "--timeout", "20", "--json"],
    );
    let brief = in_ns(
        &lab,
        &a,
        &[
            "island",
            "new",
            "mayfly",
            "--router",
            &router_addr,
            "--json",
        ],
    );
    brief.next_line();
    loop {
        let v: Value = serde_json::from_str(&watch.next_line()).expect("json");
        if v["name"] == "mayfly" && v["event"] == "heard" {
            break;
        }
    }
    brief.signal("INT");
    let (status, _, err) = brief.finish();
    assert!(status.success(), "{err}");
    let left = Instant::now();
    loop {
        let line = watch
            .line_within(Duration::from_secs(15))
            .expect("mayfly should be reported gone");
        let v: Value = serde_json::from_str(&line).expect("json");
        if v["name"] == "mayfly" && v["event"] == "gone" {
            break;
        }
        assert!(
            !(v["name"] == "lagoon" && v["event"] == "gone"),
            "a live island never goes: {line}"
        );
    }
    // Linger (0.5 s) plus three intervals (1.5 s), with room for a slow machine.
    assert!(
        left.elapsed() < Duration::from_secs(8),
        "{:?}",
        left.elapsed()
    );
    let _ = watch.finish_killed();
    let _ = open.finish_killed();
    let _ = private.finish_killed();
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
}
