//! A network lab built from Linux network namespaces: test hosts with their own addresses,
//! joined by veth pairs, created by the test and removed when the lab is dropped. Packets sent
//! inside it never reach any real network.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static LABS: AtomicUsize = AtomicUsize::new(0);

/// Set (to anything but empty or 0) to make a lab that cannot be built fail the test instead of
/// skipping it. `.ci/run` sets it, so CI really runs the lab tests.
pub const REQUIRE_VAR: &str = "ISTHMUS_REQUIRE_NETNS";

/// Namespaces made for one test.
pub struct NetLab {
    prefix: String,
    hosts: Vec<String>,
    links: usize,
}

/// A system tool by name, also looked for in the sbin directories, which a non-login PATH may
/// leave out.
pub fn tool(name: &str) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found.map_or_else(|| name.to_string(), |p| p.to_string_lossy().into_owned())
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(tool("ip"))
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// True when a test that cannot build its lab must fail instead of skipping (CI sets it).
pub fn required() -> bool {
    std::env::var(REQUIRE_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

impl NetLab {
    /// A new, empty lab; `None` (after a loud message) when this machine cannot build one.
    pub fn new(test: &str) -> Option<NetLab> {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let lab = NetLab {
            prefix: format!("isth{}x{n}", std::process::id() % 100_000),
            hosts: Vec::new(),
            links: 0,
        };
        let probe = format!("{}probe", lab.prefix);
        match ip(&["netns", "add", &probe]) {
            Ok(_) => {
                let _ = ip(&["netns", "del", &probe]);
                Some(lab)
            }
            Err(e) => skip(&format!(
                "SKIPPED {test}: needs root and network namespaces ({e}). \
                 Run as root (as .ci/run does) to exercise it."
            )),
        }
    }

    /// Adds a host (a namespace with loopback up) and returns its namespace name.
    pub fn host(&mut self, name: &str) -> String {
        let ns = format!("{}{}", self.prefix, name);
        ip(&["netns", "add", &ns]).expect("add namespace");
        self.hosts.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]).expect("loopback up");
        ns
    }

    /// A veth pair with one end in host `a` and the other in host `b`: (a's end, b's end).
    /// Made inside the namespaces, never in the machine's own, so removing the namespaces
    /// removes it whatever fails later.
    fn veth(&mut self, a: &str, b: &str) -> (String, String) {
        self.links += 1;
        // Interface names are at most 15 bytes.
        let mut ia = format!("va{}{}", self.links, &self.prefix[4..]);
        let mut ib = format!("vb{}{}", self.links, &self.prefix[4..]);
        ia.truncate(15);
        ib.truncate(15);
        ip(&[
            "-n", a, "link", "add", &ia, "type", "veth", "peer", "name", &ib, "netns", b,
        ])
        .expect("veth pair");
        (ia, ib)
    }

    /// Joins two hosts with a veth pair and gives each end an address (CIDR notation; the
    /// broadcast address is derived).
    pub fn link(&mut self, a: &str, a_cidr: &str, b: &str, b_cidr: &str) {
        let (ia, ib) = self.veth(a, b);
        let (ia, ib) = (ia.as_str(), ib.as_str());
        ip(&["-n", a, "addr", "add", a_cidr, "brd", "+", "dev", ia]).expect("address");
        ip(&["-n", b, "addr", "add", b_cidr, "brd", "+", "dev", ib]).expect("address");
        ip(&["-n", a, "link", "set", ia, "up"]).expect("up");
        ip(&["-n", b, "link", "set", ib, "up"]).expect("up");
    }

    /// Joins two hosts with a veth pair that carries IPv6 only: each end gets its link-local
    /// address and the given (unique-local) address, usable at once (no duplicate address
    /// detection to wait for), and no IPv4 address.
    pub fn link_v6(&mut self, a: &str, a_cidr: &str, b: &str, b_cidr: &str) {
        let (ia, ib) = self.veth(a, b);
        let (ia, ib) = (ia.as_str(), ib.as_str());
        for (ns, iface, cidr) in [(a, ia, a_cidr), (b, ib, b_cidr)] {
            // Namespaces start with IPv6 on, but a host may have turned it off by default.
            let sysctl = format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6");
            self.run(ns, "sh", &["-c", &format!("echo 0 > {sysctl}")]);
            ip(&["-n", ns, "-6", "addr", "add", cidr, "dev", iface, "nodad"]).expect("address");
            ip(&["-n", ns, "link", "set", iface, "up"]).expect("up");
        }
        // The link-local addresses are made when the link comes up; wait until both are usable.
        for ns in [a, b] {
            let ready = (0..100).any(|_| {
                let out = ip(&["-n", ns, "-6", "addr", "show", "scope", "link"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if out.contains("fe80::") && !out.contains("tentative") {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
                false
            });
            assert!(ready, "no usable link-local IPv6 address in {ns}");
        }
    }

    /// A command that runs `program` inside host `ns`.
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new(tool("ip"));
        let program = if program.contains('/') {
            program.to_string()
        } else {
            tool(program)
        };
        c.args(["netns", "exec", ns, &program]);
        c
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for ns in self.hosts.drain(..) {
            // Anything still running inside goes first, or the namespace lingers.
            if let Ok(out) = ip(&["netns", "pids", &ns]) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new(tool("kill")).args(["-9", pid]).status();
                }
            }
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

impl NetLab {
    /// Runs a command inside host `ns` and returns its stdout; panics with its stderr on failure.
    pub fn run(&self, ns: &str, program: &str, args: &[&str]) -> String {
        let out = self
            .command(ns, program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Adds a default route to host `ns` via `gateway`.
    pub fn default_route(&self, ns: &str, gateway: &str) {
        ip(&["-n", ns, "route", "add", "default", "via", gateway]).expect("default route");
    }

    /// Turns host `ns` into a router that forwards packets.
    pub fn forward(&self, ns: &str) {
        self.run(ns, "sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
    }

    /// The name of the interface in `ns` that carries `addr` (as given to [`NetLab::link`]).
    pub fn iface_of(&self, ns: &str, addr: &str) -> String {
        let out = ip(&["-n", ns, "-o", "-4", "addr", "show"]).expect("addresses");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.contains(&format!(" {addr}/")))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no interface with {addr} in {ns}: {text}"))
    }
}

/// Says loudly that a test cannot run here and returns `None`, or fails when CI requires it.
/// The line starts with `!!!!!!!! SKIPPED` so `.ci/run` can count skips apart from passes.
pub fn skip<T>(msg: &str) -> Option<T> {
    if required() {
        panic!("{msg} ({REQUIRE_VAR} is set, so this is a failure)");
    }
    // Straight to the stderr handle: the test harness captures eprintln! output of passing
    // tests, and a skip must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n!!!!!!!! {msg}\n");
    None
}

/// Where `tests/lab/build-miniupnpd.sh` leaves the miniupnpd 2.3.9 binary (the same rule as the
/// script: `$ISTHMUS_LAB_CACHE`, else the user's cache directory).
fn miniupnpd_path() -> std::path::PathBuf {
    let cache = std::env::var_os("ISTHMUS_LAB_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|c| std::path::PathBuf::from(c).join("isthmus-lab"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                std::path::PathBuf::from(h)
                    .join(".cache")
                    .join("isthmus-lab")
            })
        })
        .unwrap_or_else(|| std::path::PathBuf::from("/nonexistent"));
    // The name carries the lab build's version (see the script): an older cached build is not
    // used by mistake.
    cache.join("miniupnpd-2.3.9-lab2")
}

/// The lab's miniupnpd built with PCP compiled out: a NAT-PMP-only gateway (see
/// `tests/lab/build-miniupnpd.sh`).
pub fn miniupnpd_nopcp() -> String {
    let mut p = miniupnpd_path().into_os_string();
    p.push("-nopcp");
    p.to_string_lossy().into_owned()
}

/// The lab's miniupnpd built with IPv6 (PCP opens IPv6 pinholes), for [`HomeNet::dual_stack`].
pub fn miniupnpd_ipv6() -> String {
    let mut p = miniupnpd_path().into_os_string();
    p.push("-ipv6");
    p.to_string_lossy().into_owned()
}

/// Which protocols the lab gateway speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayProtocols {
    /// UPnP IGD only.
    Upnp,
    /// PCP and NAT-PMP, no UPnP.
    PcpPmp,
    /// NAT-PMP only (the build without PCP), no UPnP.
    NatPmpOnly,
    /// UPnP, PCP and NAT-PMP.
    All,
}

/// The lab's miniupnpd binary. Tests never build or install anything: `.ci/run` (or
/// `bash tests/lab/build-miniupnpd.sh` by hand) prepares it, and [`HomeNet`] skips without it.
pub fn miniupnpd() -> String {
    miniupnpd_path().to_string_lossy().into_owned()
}

/// A home network: `lan` (10.210.1.2) behind `gw` (10.210.1.1 inside, 203.0.113.1 outside,
/// masquerading), and `wan` (203.0.113.2), a remote user on the "Internet" side. The WAN side
/// uses a documentation range, which Isthmus treats as public: it stands in for the Internet.
pub struct HomeNet {
    /// The lab (dropping it removes everything).
    pub lab: NetLab,
    /// The LAN host.
    pub lan: String,
    /// The home gateway.
    pub gw: String,
    /// The remote host.
    pub wan: String,
    /// The gateway's WAN interface.
    pub gw_wan_if: String,
    /// The gateway's LAN interface.
    pub gw_lan_if: String,
    /// A directory for this network's files (configs, prefs), removed with it.
    pub scratch: std::path::PathBuf,
    /// The gateway's WAN address.
    pub gw_wan_ip: String,
    /// The network also carries IPv6 (see [`HomeNet::dual_stack`]).
    pub ipv6: bool,
}

impl Drop for HomeNet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// LAN host address.
pub const LAN_IP: &str = "10.210.1.2";
/// Gateway's LAN address.
pub const GW_LAN_IP: &str = "10.210.1.1";
/// Gateway's WAN (external) address.
pub const GW_WAN_IP: &str = "203.0.113.1";
/// Remote host address.
pub const WAN_IP: &str = "203.0.113.2";
/// LAN host's global IPv6 address (in a dual-stack [`HomeNet`]).
pub const LAN_IP6: &str = "2001:db8:1::2";
/// Gateway's LAN-side IPv6 address.
pub const GW_LAN_IP6: &str = "2001:db8:1::1";
/// Gateway's WAN-side IPv6 address.
pub const GW_WAN_IP6: &str = "2001:db8:2::1";
/// Remote host's IPv6 address.
pub const WAN_IP6: &str = "2001:db8:2::2";

impl HomeNet {
    /// Builds the network with NAT and the nftables layout miniupnpd expects; `None` when the
    /// machine cannot (see [`NetLab::new`]).
    pub fn new(test: &str) -> Option<HomeNet> {
        Self::build(test, GW_WAN_IP, WAN_IP)
    }

    /// The same network, but the gateway's "outside" is itself a private network (10.220.0.0/24):
    /// double NAT as seen from the LAN host.
    pub fn behind_private_wan(test: &str) -> Option<HomeNet> {
        Self::build(test, "10.220.0.1", "10.220.0.2")
    }

    /// The same network with IPv6 beside IPv4: global addresses on both sides (documentation
    /// ranges), routed by the gateway without NAT, and a firewall on the gateway that lets no
    /// new IPv6 connection in from the WAN unless miniupnpd opened a pinhole for it (its
    /// `miniupnpd` chain comes first). The gateway runs the IPv6 build of miniupnpd.
    pub fn dual_stack(test: &str) -> Option<HomeNet> {
        let mut net = Self::build(test, GW_WAN_IP, WAN_IP)?;
        net.ipv6 = true;
        let lan_if = net.lab.iface_of(&net.lan, LAN_IP);
        let wan_if = net.lab.iface_of(&net.wan, WAN_IP);
        for (ns, iface, cidr) in [
            (&net.lan, lan_if.as_str(), format!("{LAN_IP6}/64")),
            (&net.gw, net.gw_lan_if.as_str(), format!("{GW_LAN_IP6}/64")),
            (&net.gw, net.gw_wan_if.as_str(), format!("{GW_WAN_IP6}/64")),
            (&net.wan, wan_if.as_str(), format!("{WAN_IP6}/64")),
        ] {
            let sysctl = format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6");
            net.lab
                .run(ns, "sh", &["-c", &format!("echo 0 > {sysctl}")]);
            ip(&["-n", ns, "-6", "addr", "add", &cidr, "dev", iface, "nodad"]).expect("address");
        }
        ip(&[
            "-n", &net.lan, "-6", "route", "add", "default", "via", GW_LAN_IP6,
        ])
        .expect("route");
        ip(&[
            "-n", &net.wan, "-6", "route", "add", "default", "via", GW_WAN_IP6,
        ])
        .expect("route");
        net.lab.run(
            &net.gw,
            "sh",
            &["-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"],
        );
        let wan = format!("iifname \"{}\"", net.gw_wan_if);
        for rule in [
            "ct state established,related accept".to_string(),
            format!("meta nfproto ipv6 {wan} drop"),
        ] {
            let mut args = vec!["add", "rule", "inet", "filter", "forward"];
            args.extend(rule.split(' '));
            net.lab.run(&net.gw, "nft", &args);
        }
        Some(net)
    }

    fn build(test: &str, gw_wan_ip: &str, wan_ip: &str) -> Option<HomeNet> {
        let mut lab = NetLab::new(test)?;
        let builds = [miniupnpd(), miniupnpd_nopcp(), miniupnpd_ipv6()];
        if builds.iter().any(|b| !Path::new(b).is_file()) {
            return skip(&format!(
                "SKIPPED {test}: needs the lab's miniupnpd 2.3.9 builds at {} (and -nopcp, -ipv6); \
                 build them once with `bash tests/lab/build-miniupnpd.sh` (as root; .ci/run \
                 does this)",
                miniupnpd_path().display()
            ));
        }
        let lan = lab.host("lan");
        let gw = lab.host("gw");
        let wan = lab.host("wan");
        lab.link(
            &lan,
            &format!("{LAN_IP}/24"),
            &gw,
            &format!("{GW_LAN_IP}/24"),
        );
        lab.link(
            &gw,
            &format!("{gw_wan_ip}/24"),
            &wan,
            &format!("{wan_ip}/24"),
        );
        lab.default_route(&lan, GW_LAN_IP);
        lab.forward(&gw);
        let gw_wan_if = lab.iface_of(&gw, gw_wan_ip);
        let gw_lan_if = lab.iface_of(&gw, GW_LAN_IP);
        let rules = format!(
            "table inet filter {{
  chain miniupnpd {{ }}
  chain forward {{ type filter hook forward priority 0; policy accept; jump miniupnpd; }}
  chain prerouting_miniupnpd {{ }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }}
  chain postrouting_miniupnpd {{ }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; oifname \"{gw_wan_if}\" masquerade; }}
}}
"
        );
        let scratch = std::env::temp_dir().join(format!("{}-home", lab.prefix));
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let file = scratch.join("nft.conf");
        std::fs::write(&file, rules).expect("write nft rules");
        lab.run(&gw, "nft", &["-f", file.to_str().expect("path")]);
        Some(HomeNet {
            scratch,
            ipv6: false,
            gw_wan_ip: gw_wan_ip.to_string(),
            lab,
            lan,
            gw,
            wan,
            gw_wan_if,
            gw_lan_if,
        })
    }

    /// Starts miniupnpd on the gateway with extra config lines (e.g. `allow ...` / `deny ...`,
    /// `ext_ip=...`). Waits until it answers on its HTTP port.
    pub fn start_upnp(&self, extra: &[&str]) -> std::process::Child {
        self.start_upnp_on(5555, extra)
    }

    /// Like [`HomeNet::start_upnp`], with the gateway's HTTP (SOAP) port chosen.
    pub fn start_upnp_on(&self, http_port: u16, extra: &[&str]) -> std::process::Child {
        self.start_gateway_on(GatewayProtocols::Upnp, http_port, extra)
    }

    /// Starts miniupnpd speaking `protocols`, with extra config lines. Waits until it answers
    /// (on its HTTP port, or on UDP 5351 when it speaks no UPnP).
    pub fn start_gateway(
        &self,
        protocols: GatewayProtocols,
        extra: &[&str],
    ) -> std::process::Child {
        self.start_gateway_on(protocols, 5555, extra)
    }

    fn start_gateway_on(
        &self,
        protocols: GatewayProtocols,
        http_port: u16,
        extra: &[&str],
    ) -> std::process::Child {
        let bin = if protocols == GatewayProtocols::NatPmpOnly {
            miniupnpd_nopcp()
        } else if self.ipv6 {
            miniupnpd_ipv6()
        } else {
            miniupnpd()
        };
        let upnp = matches!(protocols, GatewayProtocols::Upnp | GatewayProtocols::All);
        let pmp = protocols != GatewayProtocols::Upnp;
        let yn = |b: bool| if b { "yes" } else { "no" };
        let dir = self.scratch.clone();
        let conf = dir.join("miniupnpd.conf");
        // PCP leases are held to at least min_lifetime (120 s unless said): the lab asks for
        // seconds, so renewals show within a test.
        let mut text = format!(
            "ext_ifname={}\nlistening_ip={}\nhttp_port={http_port}\nenable_upnp={}\nenable_pcp_pmp={}\n\
             {}secure_mode=yes\nsystem_uptime=yes\nnotify_interval=60\nclean_ruleset_interval=600\n\
             uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n",
            self.gw_wan_if,
            self.gw_lan_if,
            yn(upnp),
            yn(pmp),
            // Only a build with PCP knows the option (and refuses to start on an unknown one).
            if protocols == GatewayProtocols::NatPmpOnly {
                ""
            } else {
                "min_lifetime=2\n"
            }
        );
        for l in extra {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(&conf, text).expect("write conf");
        let mut child = self
            .lab
            .command(&self.gw, &bin)
            .args(["-d", "-f", conf.to_str().expect("path")])
            .args(["-P", dir.join("pid").to_str().expect("path")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start miniupnpd");
        for _ in 0..100 {
            let ok = if upnp {
                self.lab
                    .command(&self.lan, "bash")
                    .args(["-c", &format!("exec 3<>/dev/tcp/{GW_LAN_IP}/{http_port}")])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            } else {
                self.lab
                    .command(&self.gw, "ss")
                    .args(["-Hlun", "sport = :5351"])
                    .output()
                    .is_ok_and(|o| !o.stdout.is_empty())
            };
            if ok {
                return child;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("miniupnpd ({protocols:?}) did not come up");
    }

    /// The gateway's NAT rules as text.
    pub fn nat_rules(&self) -> String {
        self.lab.run(&self.gw, "nft", &["list", "ruleset"])
    }
}
