//! Port forwarding through a real NAT gateway: a home network in network namespaces with
//! miniupnpd on the gateway and a remote user on the WAN side.

use crate::homelab::{
    a_taken_port_gets_another_that_renewals_keep, double_nat_stops_a_strict_router, in_ns, island,
    prefs_file, remote_join, router_with_profile, second_lan_machine,
};
use isthmus_tests::netns::{HomeNet, GW_WAN_IP, LAN_IP};
use serde_json::Value;
use std::time::{Duration, Instant};

#[test]
fn upnp_maps_renews_serves_a_remote_user_and_unmaps_on_sigterm() {
    let Some(net) = HomeNet::new("upnp_maps_renews_serves_a_remote_user_and_unmaps_on_sigterm")
    else {
        return;
    };
    let mut upnp = net.start_upnp(&[
        "ext_allow_private_ipv4=yes",
        &format!("ext_ip={GW_WAN_IP}"),
        "allow 1024-65535 10.210.1.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]);
    let prefs = prefs_file(
        &net,
        "default = \"home\"\n\n[profiles.home]\n# short lease, so renewal shows within the test\nforwarding = \"upnp\"\nupnp.lease_secs = 4\nupnp.fallback = \"fail\"\nbeacon = false\n",
    );
    let started = Instant::now();
    let router = in_ns(
        &net,
        &net.lan,
        &["--prefs", &prefs, "router", "--profile", "home"],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    let rules = net.nat_rules();
    assert!(
        rules.contains(&format!("{LAN_IP}:7470")),
        "mapping in the gateway:\n{rules}"
    );

    let (creator, card, fields) = island(&net, "harbour");
    assert_eq!(fields["external"], format!("{GW_WAN_IP}:7470").as_str());
    remote_join(&net, &card);

    // Outlive the 4 s lease: the mapping must still be there, renewed every 2 s.
    router.wait_stderr("UPnP mapping renewed", 3);
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "past the first lease"
    );
    assert!(
        net.nat_rules().contains(&format!("{LAN_IP}:7470")),
        "renewed, not expired"
    );
    remote_join(&net, &card);

    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("external {GW_WAN_IP}:7470 (UPnP, lease 4 s")),
        "summary line: {err}"
    );
    assert!(
        err.matches("UPnP mapping renewed").count() >= 2,
        "renewals: {err}"
    );
    let rules = net.nat_rules();
    assert!(
        !rules.contains(&format!("{LAN_IP}:7470")),
        "mapping removed:\n{rules}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let _ = creator.finish_killed();
    let _ = upnp.kill();
    let _ = upnp.wait();
}

#[test]
fn a_manual_forward_is_published_and_works_from_outside() {
    let Some(net) = HomeNet::new("a_manual_forward_is_published_and_works_from_outside") else {
        return;
    };
    // The user forwarded 7000 on the gateway to the router by hand.
    net.lab.run(
        &net.gw,
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "filter",
            "prerouting",
            "iifname",
            &net.gw_wan_if,
            "tcp",
            "dport",
            "7000",
            "dnat",
            "ip",
            "to",
            &format!("{LAN_IP}:7470"),
        ],
    );
    let external = format!("{GW_WAN_IP}:7000");
    let router = in_ns(
        &net,
        &net.lan,
        &[
            "router",
            "--forwarding",
            "manual",
            "--external",
            &external,
            "--no-beacon",
        ],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    let (creator, card, fields) = island(&net, "cove");
    assert_eq!(fields["external"], external.as_str());
    assert_eq!(fields["internal"][0], format!("{LAN_IP}:7470").as_str());
    remote_join(&net, &card);
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("external {external} (forwarded by hand)")),
        "{err}"
    );
    let _ = creator.finish_killed();
}

#[test]
fn a_gateway_that_refuses_is_reported_and_the_lan_only_fallback_followed() {
    let Some(net) =
        HomeNet::new("a_gateway_that_refuses_is_reported_and_the_lan_only_fallback_followed")
    else {
        return;
    };
    let mut upnp = net.start_upnp(&[
        "ext_allow_private_ipv4=yes",
        &format!("ext_ip={GW_WAN_IP}"),
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]);
    // The built-in `upnp` profile falls back to LAN-only.
    let router = in_ns(
        &net,
        &net.lan,
        &["router", "--profile", "upnp", "--no-beacon"],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    let (creator, _, fields) = island(&net, "shoal");
    assert_eq!(
        fields["external"],
        Value::Null,
        "no external address is advertised"
    );
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(err.contains("refused to map"), "{err}");
    assert!(
        err.contains("remote users cannot reach this router"),
        "{err}"
    );
    assert!(err.contains("external none"), "{err}");
    let _ = creator.finish_killed();
    let _ = upnp.kill();
    let _ = upnp.wait();
}

#[test]
fn double_nat_is_said_plainly_and_a_fail_fallback_stops_the_router() {
    let Some(net) = HomeNet::new("double_nat_is_said_plainly_and_a_fail_fallback_stops_the_router")
    else {
        return;
    };
    // This gateway's own WAN address is private: it sits behind another NAT.
    let mut upnp = net.start_upnp(&[
        "ext_allow_private_ipv4=yes",
        "ext_ip=10.99.0.1",
        "allow 1024-65535 10.210.1.0/24 1024-65535",
    ]);
    double_nat_stops_a_strict_router(&net, "upnp");
    assert!(
        !net.nat_rules().contains(&format!("{LAN_IP}:7470")),
        "nothing was mapped"
    );
    let _ = upnp.kill();
    let _ = upnp.wait();
}

#[test]
fn a_taken_external_port_falls_back_to_any_port_and_the_postcard_says_which() {
    let Some(net) =
        HomeNet::new("a_taken_external_port_falls_back_to_any_port_and_the_postcard_says_which")
    else {
        return;
    };
    // A second machine on the LAN, played by a second address of the LAN host. The gateway
    // must let a client map for another address (secure_mode off) for it to take a port.
    second_lan_machine(&net);
    let mut upnp = net.start_upnp(&[
        "secure_mode=no",
        "ext_allow_private_ipv4=yes",
        &format!("ext_ip={GW_WAN_IP}"),
        "allow 1024-65535 10.210.1.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]);
    a_taken_port_gets_another_that_renewals_keep(&net, "upnp", "UPnP");
    let _ = upnp.kill();
    let _ = upnp.wait();
}

#[test]
fn a_gateway_that_comes_back_on_another_port_is_found_again() {
    let Some(net) = HomeNet::new("a_gateway_that_comes_back_on_another_port_is_found_again") else {
        return;
    };
    let conf = [
        "ext_allow_private_ipv4=yes",
        &format!("ext_ip={GW_WAN_IP}"),
        "allow 1024-65535 10.210.1.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ];
    let mut upnp = net.start_upnp_on(5555, &conf);
    let router = router_with_profile(
        &net,
        "forwarding = \"upnp\"\nupnp.lease_secs = 2\nupnp.fallback = \"fail\"\n",
    );
    let (creator, card, _) = island(&net, "atoll");
    // The gateway reboots and now serves UPnP on another HTTP port.
    let _ = upnp.kill();
    let _ = upnp.wait();
    let mut upnp = net.start_upnp_on(5566, &conf);
    // Renewals every second find it again; the mapping (and the postcard) keep working.
    let log = router.wait_stderr("searching for the gateway again", 1);
    let before = log.matches("UPnP mapping renewed").count();
    router.wait_stderr("UPnP mapping renewed", before + 1);
    remote_join(&net, &card);
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(err.contains("searching for the gateway again"), "{err}");
    let after = err
        .rsplit("searching for the gateway again")
        .next()
        .expect("log after the search");
    assert!(
        after.contains("UPnP mapping renewed"),
        "mapped again after the search: {err}"
    );
    assert!(
        !net.nat_rules().contains(&format!("{LAN_IP}:7470")),
        "removed on SIGTERM"
    );
    let _ = creator.finish_killed();
    let _ = upnp.kill();
    let _ = upnp.wait();
}

#[test]
fn behind_double_nat_the_best_effort_profile_keeps_the_mapping_and_says_so() {
    let Some(net) = HomeNet::behind_private_wan(
        "behind_double_nat_the_best_effort_profile_keeps_the_mapping_and_says_so",
    ) else {
        return;
    };
    let ext = net.gw_wan_ip.clone();
    let mut upnp = net.start_upnp(&[
        "ext_allow_private_ipv4=yes",
        &format!("ext_ip={ext}"),
        "allow 1024-65535 10.210.1.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]);
    // The built-in `upnp` profile: best effort, fallback lan-only.
    let router = in_ns(
        &net,
        &net.lan,
        &["router", "--profile", "upnp", "--no-beacon"],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    let (creator, card, fields) = island(&net, "lagoon");
    assert_eq!(fields["external"], format!("{ext}:7470").as_str());
    // A host on the gateway's outer network gets in through the mapping.
    remote_join(&net, &card);
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(err.contains("double NAT"), "said plainly: {err}");
    assert!(err.contains("not reachable from the Internet"), "{err}");
    assert!(
        !net.nat_rules().contains(&format!("{LAN_IP}:7470")),
        "removed on SIGTERM"
    );
    let _ = creator.finish_killed();
    let _ = upnp.kill();
    let _ = upnp.wait();
}
