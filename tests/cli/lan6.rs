//! The LAN beacon over IPv6: two hosts joined by a link with IPv6 only (unique-local addresses,
//! or link-local ones alone; no IPv4), one running a router, the other finding its island by the
//! multicast beacon and joining it.

use crate::lan::{heard_island, json_lines};
use crate::proc::in_netns as in_ns;
use isthmus_tests::netns::NetLab;
use serde_json::Value;

const A_IP: &str = "fd71:7471::1";
const B_IP: &str = "fd71:7471::2";

#[test]
fn on_a_link_with_only_ipv6_an_island_is_found_by_beacon_and_joined() {
    let Some(mut lab) =
        NetLab::new("on_a_link_with_only_ipv6_an_island_is_found_by_beacon_and_joined")
    else {
        return;
    };
    let a = lab.host("a");
    let b = lab.host("b");
    lab.link_v6(&a, &format!("{A_IP}/64"), &b, &format!("{B_IP}/64"));
    // Neither host has an IPv4 address beyond loopback.
    let v4 = lab.run(&b, "ip", &["-4", "-o", "addr", "show", "scope", "global"]);
    assert!(v4.trim().is_empty(), "no IPv4: {v4}");

    let router = in_ns(
        &lab,
        &a,
        &["router", "--listen", "::", "--beacon-interval-ms", "500"],
    );
    assert_eq!(router.next_line(), "listening on [::]:7470");
    let router_addr = format!("[{A_IP}]:7470");
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
    open.next_line();

    // Host B hears it over IPv6 multicast, from A's unique-local address.
    let (status, lines, err) = in_ns(&lab, &b, &["discover", "--timeout", "5", "--json"]).finish();
    assert!(status.success(), "{err}");
    let lagoon = heard_island(&json_lines(&lines), "lagoon", &err);
    assert_eq!(lagoon["router"], router_addr.as_str());
    assert_eq!(lagoon["open"], true);

    // And joins it by name: send and receive.
    let (status, lines, err) = in_ns(
        &lab,
        &b,
        &[
            "join",
            "--discover",
            "lagoon",
            "--send",
            "hello over v6",
            "--json",
            "--exit-after-seq",
            "1",
        ],
    )
    .finish();
    assert!(status.success(), "{err}");
    let got: Value = serde_json::from_str(&lines[0]).expect("json");
    assert_eq!(got["text"], "hello over v6");
    assert!(
        open.next_line().contains("hello over v6"),
        "the creator got it too"
    );
    let _ = open.finish_killed();
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
}

#[test]
fn on_a_link_with_only_link_local_ipv6_an_island_is_still_found_and_joined() {
    let Some(mut lab) =
        NetLab::new("on_a_link_with_only_link_local_ipv6_an_island_is_still_found_and_joined")
    else {
        return;
    };
    let a = lab.host("a");
    let b = lab.host("b");
    // Two hosts and no IPv6 router: nothing hands out addresses, only fe80:: is left.
    lab.link_v6(&a, &format!("{A_IP}/64"), &b, &format!("{B_IP}/64"));
    for ns in [&a, &b] {
        lab.run(ns, "ip", &["-6", "addr", "flush", "scope", "global"]);
        let global = lab.run(ns, "ip", &["-o", "addr", "show", "scope", "global"]);
        assert!(global.trim().is_empty(), "link-local only: {global}");
    }

    let router = in_ns(
        &lab,
        &a,
        &["router", "--listen", "::", "--beacon-interval-ms", "500"],
    );
    assert_eq!(router.next_line(), "listening on [::]:7470");
    let open = in_ns(
        &lab,
        &a,
        &["island", "new", "cove", "--router", "[::1]:7470", "--json"],
    );
    open.next_line();

    // Heard from A's link-local address, with the scope that makes it usable.
    let (status, lines, err) = in_ns(&lab, &b, &["discover", "--timeout", "5", "--json"]).finish();
    assert!(status.success(), "{err}");
    let cove = heard_island(&json_lines(&lines), "cove", &err);
    let at = cove["router"].as_str().expect("router address");
    assert!(at.starts_with("[fe80::") && at.contains('%'), "{at}");

    let (status, lines, err) = in_ns(
        &lab,
        &b,
        &[
            "join",
            "--discover",
            "cove",
            "--send",
            "hello on the link",
            "--json",
            "--exit-after-seq",
            "1",
        ],
    )
    .finish();
    assert!(status.success(), "{err}");
    let got: Value = serde_json::from_str(&lines[0]).expect("json");
    assert_eq!(got["text"], "hello on the link");
    let _ = open.finish_killed();
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
}
