//! Port forwarding through a real gateway that speaks PCP and NAT-PMP (miniupnpd with UPnP off,
//! or with all three on): `--forwarding auto` and the single-protocol modes, renewal, removal on
//! SIGTERM and the reachability check.

use crate::homelab::{
    a_taken_port_gets_another_that_renewals_keep, double_nat_stops_a_strict_router, in_ns, island,
    remote_join, router_with_profile, second_lan_machine,
};
use crate::proc::{Proc, BIN};
use isthmus_tests::netns::{tool, GatewayProtocols, HomeNet, NetLab, GW_WAN_IP, LAN_IP, LAN_IP6};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The gateway lets the LAN map its own ports and nothing else.
const RULES: [&str; 2] = [
    "allow 1024-65535 10.210.1.0/24 1024-65535",
    "deny 0-65535 0.0.0.0/0 0-65535",
];

fn gateway(net: &HomeNet, protocols: GatewayProtocols) -> std::process::Child {
    let ext = format!("ext_ip={GW_WAN_IP}");
    let mut conf = vec!["ext_allow_private_ipv4=yes", ext.as_str()];
    conf.extend(RULES);
    net.start_gateway(protocols, &conf)
}

/// Whether miniupnpd holds a mapping to the router (its rule; a lab's own hairpin rule reads
/// `dnat to`, without the `ip`).
fn mapped(net: &HomeNet) -> bool {
    net.nat_rules()
        .contains(&format!("dnat ip to {LAN_IP}:7470"))
}

/// The whole life of a mapping by `protocol` through a gateway speaking `gateway_protocols`:
/// granted, used from the WAN, renewed past its lease, removed on SIGTERM.
fn maps_renews_serves_and_unmaps(test: &str, gateway_protocols: GatewayProtocols, protocol: &str) {
    let Some(net) = HomeNet::new(test) else {
        return;
    };
    let mut gw = gateway(&net, gateway_protocols);
    let started = Instant::now();
    // A short lease, so renewals show within the test.
    let router = router_with_profile(
        &net,
        "forwarding = \"auto\"\nupnp.lease_secs = 4\nupnp.fallback = \"fail\"\n",
    );
    assert!(mapped(&net), "mapping in the gateway:\n{}", net.nat_rules());
    let (creator, card, fields) = island(&net, "harbour");
    assert_eq!(fields["external"], format!("{GW_WAN_IP}:7470").as_str());
    remote_join(&net, &card);

    // Outlive the 4 s lease: renewed every 2 s, still mapped, still usable.
    let renewed = format!("{protocol} mapping renewed");
    router.wait_stderr(&renewed, 3);
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "past the first lease"
    );
    assert!(mapped(&net), "renewed, not expired:\n{}", net.nat_rules());
    remote_join(&net, &card);

    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("external {GW_WAN_IP}:7470 ({protocol}, lease 4 s")),
        "summary line: {err}"
    );
    assert!(
        err.contains(&format!("{protocol} mapping granted")),
        "{err}"
    );
    // `auto` says why it passed over the protocols before the one that granted.
    let passed_over = match protocol {
        "NAT-PMP" => {
            Some("PCP got no mapping (PCP: no gateway answered (the gateway does not speak PCP")
        }
        "UPnP" => Some("PCP and NAT-PMP got no mapping (PCP: no gateway answered (UDP port 5351"),
        _ => None,
    };
    if let Some(said) = passed_over {
        assert!(err.contains(said), "{err}");
        assert!(err.contains(&format!("; {protocol} granted it")), "{err}");
    }
    assert!(err.matches(&renewed).count() >= 2, "renewals: {err}");
    assert!(
        err.contains(&format!("{protocol} mapping removed")),
        "{err}"
    );
    // This gateway does not loop LAN connections back to its external address: the router
    // says it could not confirm reachability, on the summary line and in the log.
    assert!(
        err.contains(&format!(
            "reachability not confirmed: the gateway reports the mapping, but a connection from this host to {GW_WAN_IP}:7470 did not come back"
        )),
        "{err}"
    );
    assert!(!mapped(&net), "mapping removed:\n{}", net.nat_rules());
    let _ = creator.finish_killed();
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn auto_maps_through_pcp_renews_serves_a_remote_user_and_unmaps_on_sigterm() {
    maps_renews_serves_and_unmaps(
        "auto_maps_through_pcp_renews_serves_a_remote_user_and_unmaps_on_sigterm",
        GatewayProtocols::PcpPmp,
        "PCP",
    );
}

#[test]
fn auto_falls_back_to_natpmp_on_a_gateway_without_pcp() {
    maps_renews_serves_and_unmaps(
        "auto_falls_back_to_natpmp_on_a_gateway_without_pcp",
        GatewayProtocols::NatPmpOnly,
        "NAT-PMP",
    );
}

#[test]
fn with_all_three_on_auto_picks_pcp_and_a_hairpin_confirms_reachability() {
    let Some(net) =
        HomeNet::new("with_all_three_on_auto_picks_pcp_and_a_hairpin_confirms_reachability")
    else {
        return;
    };
    // This gateway loops LAN connections to its external address back in (hairpin NAT).
    let hairpin = format!(
        "table ip hairpin {{
  chain pre {{ type nat hook prerouting priority dstnat - 10; policy accept; iifname \"{lan}\" ip daddr {GW_WAN_IP} tcp dport 7470 dnat to {LAN_IP}:7470; }}
  chain post {{ type nat hook postrouting priority srcnat - 10; policy accept; iifname \"{lan}\" oifname \"{lan}\" masquerade; }}
}}
",
        lan = net.gw_lan_if
    );
    let file = net.scratch.join("hairpin.nft");
    std::fs::write(&file, hairpin).expect("write");
    net.lab
        .run(&net.gw, "nft", &["-f", file.to_str().expect("path")]);
    let mut gw = gateway(&net, GatewayProtocols::All);
    // The built-in `auto` profile.
    let router = in_ns(
        &net,
        &net.lan,
        &["router", "--profile", "auto", "--no-beacon"],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    let (creator, card, fields) = island(&net, "cove");
    assert_eq!(fields["external"], format!("{GW_WAN_IP}:7470").as_str());
    remote_join(&net, &card);
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("external {GW_WAN_IP}:7470 (PCP, lease")),
        "{err}"
    );
    assert!(!err.contains("UPnP mapping granted"), "{err}");
    assert!(
        err.contains(&format!(
            "reachability confirmed: a connection to {GW_WAN_IP}:7470 came back to this router through the gateway"
        )),
        "{err}"
    );
    assert!(!mapped(&net), "removed:\n{}", net.nat_rules());
    let _ = creator.finish_killed();
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn natpmp_and_pcp_can_be_chosen_alone() {
    let Some(net) = HomeNet::new("natpmp_and_pcp_can_be_chosen_alone") else {
        return;
    };
    let mut gw = gateway(&net, GatewayProtocols::NatPmpOnly);
    // PCP alone on a gateway without it: said plainly, and the lan-only fallback followed.
    let router = in_ns(
        &net,
        &net.lan,
        &["router", "--forwarding", "pcp", "--no-beacon"],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("no PCP gateway answered on the LAN (the gateway does not speak PCP"),
        "{err}"
    );
    assert!(err.contains("external none"), "{err}");
    assert!(!mapped(&net));

    // NAT-PMP alone on the same gateway.
    let router = in_ns(
        &net,
        &net.lan,
        &["router", "--forwarding", "natpmp", "--no-beacon"],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    assert!(mapped(&net), "{}", net.nat_rules());
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("external {GW_WAN_IP}:7470 (NAT-PMP, lease 3600 s")),
        "{err}"
    );
    assert!(!mapped(&net), "removed:\n{}", net.nat_rules());
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn pcp_behind_double_nat_is_said_plainly_and_a_fail_fallback_leaves_nothing_mapped() {
    let Some(net) = HomeNet::new(
        "pcp_behind_double_nat_is_said_plainly_and_a_fail_fallback_leaves_nothing_mapped",
    ) else {
        return;
    };
    // This gateway's own WAN address is private: it sits behind another NAT.
    let mut conf = vec!["ext_allow_private_ipv4=yes", "ext_ip=10.99.0.1"];
    conf.extend(RULES);
    let mut gw = net.start_gateway(GatewayProtocols::PcpPmp, &conf);
    let err = double_nat_stops_a_strict_router(&net, "pcp");
    // PCP tells the external address only with the grant: the mapping was removed at once.
    assert!(err.contains("PCP mapping removed"), "{err}");
    assert!(!mapped(&net), "nothing left mapped:\n{}", net.nat_rules());
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn a_taken_external_port_gets_another_by_pcp_and_renewals_keep_it() {
    let Some(net) = HomeNet::new("a_taken_external_port_gets_another_by_pcp_and_renewals_keep_it")
    else {
        return;
    };
    // A second machine on the LAN, played by a second address of the LAN host.
    second_lan_machine(&net);
    // The other machine maps by UPnP, for another address than the one its request comes from
    // (PCP and NAT-PMP map the request's source): the gateway must allow it (secure_mode off).
    let ext = format!("ext_ip={GW_WAN_IP}");
    let mut conf = vec!["secure_mode=no", "ext_allow_private_ipv4=yes", ext.as_str()];
    conf.extend(RULES);
    let mut gw = net.start_gateway(GatewayProtocols::All, &conf);
    a_taken_port_gets_another_that_renewals_keep(&net, "pcp", "PCP");
    let _ = gw.kill();
    let _ = gw.wait();
}

/// Whether miniupnpd holds an IPv6 pinhole for the LAN host (its rule matches the destination
/// address as raw header bytes).
fn pinholed(net: &HomeNet) -> bool {
    let ip: std::net::Ipv6Addr = LAN_IP6.parse().expect("addr");
    let hex: String = ip.octets().iter().map(|b| format!("{b:02x}")).collect();
    net.nat_rules().contains(&format!("0x{hex}"))
}

/// Whether the WAN host can open a TCP connection to `[addr]:port` (3 s at most).
fn wan_connects(net: &HomeNet, addr: &str, port: u16) -> bool {
    net.lab
        .command(&net.wan, "timeout")
        .args([
            "3",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{addr}/{port}"),
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn pcp_opens_an_ipv6_pinhole_for_the_router_and_closes_it_on_sigterm() {
    let Some(net) =
        HomeNet::dual_stack("pcp_opens_an_ipv6_pinhole_for_the_router_and_closes_it_on_sigterm")
    else {
        return;
    };
    let mut gw = gateway(&net, GatewayProtocols::PcpPmp);
    // The gateway's firewall keeps IPv6 users outside from a router that asks for nothing.
    let closed = in_ns(&net, &net.lan, &["router", "--listen", "::", "--no-beacon"]);
    assert_eq!(closed.next_line(), "listening on [::]:7470");
    assert!(
        !wan_connects(&net, LAN_IP6, 7470),
        "firewalled without a pinhole"
    );
    closed.signal("TERM");
    assert!(closed.finish().0.success());

    // With PCP, the router (on IPv6 too) gets its IPv4 mapping and an IPv6 pinhole.
    let router = in_ns(
        &net,
        &net.lan,
        &[
            "router",
            "--listen",
            "::",
            "--forwarding",
            "pcp",
            "--no-beacon",
        ],
    );
    assert_eq!(router.next_line(), "listening on [::]:7470");
    assert!(
        pinholed(&net),
        "pinhole in the gateway:\n{}",
        net.nat_rules()
    );
    assert!(
        wan_connects(&net, LAN_IP6, 7470),
        "the pinhole lets the WAN in"
    );
    let (creator, card, fields) = island(&net, "fjord");
    assert_eq!(fields["external"], format!("{GW_WAN_IP}:7470").as_str());
    let internal: Vec<&str> = fields["internal"]
        .as_array()
        .expect("internal addresses")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        internal.contains(&format!("[{LAN_IP6}]:7470").as_str()),
        "the postcard carries the pinholed IPv6 address: {internal:?}"
    );
    remote_join(&net, &card);
    router.signal("TERM");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("IPv6 pinhole [{LAN_IP6}]:7470 (PCP, lease")),
        "summary: {err}"
    );
    assert!(err.contains("PCP IPv6 pinhole removed"), "{err}");
    assert!(!pinholed(&net), "pinhole removed:\n{}", net.nat_rules());
    assert!(!mapped(&net), "mapping removed");
    let _ = creator.finish_killed();
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn auto_on_a_gateway_with_only_upnp_maps_through_upnp() {
    maps_renews_serves_and_unmaps(
        "auto_on_a_gateway_with_only_upnp_maps_through_upnp",
        GatewayProtocols::Upnp,
        "UPnP",
    );
}

#[test]
fn a_signal_while_auto_asks_a_silent_gateway_stops_the_router_at_once() {
    let Some(mut lab) =
        NetLab::new("a_signal_while_auto_asks_a_silent_gateway_stops_the_router_at_once")
    else {
        return;
    };
    let lan = lab.host("lan");
    let gw = lab.host("gw");
    lab.link(&lan, "10.230.1.2/24", &gw, "10.230.1.1/24");
    lab.default_route(&lan, "10.230.1.1");
    // A gateway that drops PCP and NAT-PMP without a word: `auto` would wait seconds on each.
    let nft = tool("nft");
    for rule in [
        "add table inet silent",
        "add chain inet silent input { type filter hook input priority 0 ; }",
        "add rule inet silent input udp dport 5351 drop",
    ] {
        let args: Vec<&str> = rule.split(' ').collect();
        lab.run(&gw, &nft, &args);
    }
    let mut cmd = lab.command(&lan, BIN);
    cmd.env("ISTHMUS_DATA_DIR", crate::proc::test_data_dir());
    cmd.args(["router", "--forwarding", "auto", "--no-beacon"]);
    let router = Proc::from_command(cmd);
    router.wait_stderr("asking the gateway for a port mapping", 1);
    router.signal("INT");
    let (status, _, err) = router.finish();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("stopped while asking the gateway for a port mapping"),
        "{err}"
    );
    // It did not sit through every protocol first, nor claim to be ready.
    assert!(!err.contains("no protocol got a mapping"), "{err}");
    assert!(!err.contains("router ready"), "{err}");
}
