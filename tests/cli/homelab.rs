//! The home network lab's commands, shared by the UPnP and PCP / NAT-PMP tests: the router on
//! the LAN host from a profile, an island on it, and a remote user joining by postcard.

use crate::proc::{Proc, BIN};
use isthmus_tests::netns::{HomeNet, LAN_IP};
use serde_json::Value;

pub(crate) fn in_ns(net: &HomeNet, ns: &str, args: &[&str]) -> Proc {
    let mut cmd = net.lab.command(ns, BIN);
    // Islands created here keep their admin postcards in the test run's data dir.
    cmd.env("ISTHMUS_DATA_DIR", crate::proc::test_data_dir());
    cmd.args(args);
    Proc::from_command(cmd)
}

pub(crate) fn prefs_file(net: &HomeNet, text: &str) -> String {
    let path = net.scratch.join("prefs.toml");
    std::fs::write(&path, text).expect("write prefs");
    path.to_string_lossy().into_owned()
}

/// Starts the LAN host's router from a `[profiles.home]` with these settings (beacon off).
pub(crate) fn router_with_profile(net: &HomeNet, settings: &str) -> Proc {
    let prefs = prefs_file(net, &format!("[profiles.home]\n{settings}"));
    let router = in_ns(
        net,
        &net.lan,
        &[
            "--prefs",
            &prefs,
            "router",
            "--profile",
            "home",
            "--no-beacon",
        ],
    );
    assert_eq!(router.next_line(), "listening on 0.0.0.0:7470");
    router
}

/// Creates an island on the LAN host's router and returns (creator, postcard fields).
pub(crate) fn island(net: &HomeNet, name: &str) -> (Proc, String, Value) {
    let creator = in_ns(
        net,
        &net.lan,
        &[
            "island",
            "new",
            name,
            "--router",
            &format!("{LAN_IP}:7470"),
            "--json",
        ],
    );
    let card = creator.next_line();
    let (status, lines, err) =
        in_ns(net, &net.lan, &["postcard", "show", &card, "--json"]).finish();
    assert!(status.success(), "{err}");
    let fields: Value = serde_json::from_str(&lines[0]).expect("json");
    (creator, card, fields)
}

/// The remote user joins by postcard, sends a line and sees it come back.
pub(crate) fn remote_join(net: &HomeNet, card: &str) {
    let (status, lines, err) = in_ns(
        net,
        &net.wan,
        &[
            "join",
            card,
            "--send",
            "hello from afar",
            "--json",
            "--exit-after-seq",
            "1",
        ],
    )
    .finish();
    assert!(status.success(), "remote join failed: {err}");
    let v: Value = serde_json::from_str(&lines[0]).expect("json");
    assert_eq!(v["text"], "hello from afar");
}
