//! ConfigureNetwork against a real kernel: a host-mode agent runs inside a throwaway
//! network namespace (`ip netns exec`) holding a veth pair, configures one end the way
//! it configures a guest NIC, and `ip -j` reads the result back. Needs root and iproute2;
//! skips with the reason otherwise.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{AGENT, AgentProcess};
use husk_protocol::agent::{ConfigureNetworkRequest, Interface, Route};
use husk_protocol::client::{AgentClient, ClientError, Target, connect_with_retry};
use serde_json::Value;
use ttrpc::Code;

const MAC: &str = "02:48:55:53:4b:01";

/// A named network namespace, deleted on drop (with every interface in it).
struct Netns {
    name: String,
}

impl Netns {
    /// `None` (after saying why) when this host cannot make one.
    fn create() -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: network namespaces need root");
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            eprintln!("skipping: no `ip` (iproute2) on this host");
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("husk-test-{}-{nanos:x}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        if !out.status.success() {
            eprintln!(
                "skipping: ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Netns { name })
    }

    /// `ip -n NS ARGS`, which must succeed; returns stdout.
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ip(&all)).expect("ip -j prints JSON")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A host-mode agent started inside `ns` (`ip netns exec` execs it: the child is the agent).
struct NetnsAgent {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NetnsAgent {
    fn spawn(ns: &Netns) -> NetnsAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                AGENT,
                "--log-level=warn",
                "--listen",
            ])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn ip netns exec husk-agent");
        NetnsAgent {
            child,
            socket,
            _dir: dir,
        }
    }

    async fn connect(&self) -> AgentClient {
        connect_with_retry(
            &Target::unix(&self.socket),
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .expect("agent in the namespace reachable")
    }
}

impl Drop for NetnsAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("husk-agent-{}", self.child.id())),
        );
    }
}

fn interface(mac: &str, name: &str, addresses: &[&str], mtu: u32) -> Interface {
    let mut i = Interface::new();
    i.mac = mac.into();
    i.name = name.into();
    i.addresses = addresses.iter().map(|a| a.to_string()).collect();
    i.mtu = mtu;
    i
}

fn route(destination: &str, gateway: &str, device: &str, source: &str) -> Route {
    let mut r = Route::new();
    r.destination = destination.into();
    r.gateway = gateway.into();
    r.device = device.into();
    r.source = source.into();
    r
}

fn request(interfaces: Vec<Interface>, routes: Vec<Route>) -> ConfigureNetworkRequest {
    let mut req = ConfigureNetworkRequest::new();
    req.interfaces = interfaces;
    req.routes = routes;
    req
}

/// The pod-like request: eth0 with an IPv4 and an IPv6 address, a link route, a route
/// with a preferred source, and a default route per family.
fn pod_request() -> ConfigureNetworkRequest {
    request(
        vec![interface(
            "02:48:55:53:4B:01",
            "eth0",
            &["10.231.7.2/24", "fd00:231::2/64"],
            1400,
        )],
        vec![
            // Gateway routes first in the request: the agent must reorder them.
            route("default", "10.231.7.1", "", ""),
            route("", "fd00:231::1", "eth0", ""),
            route("10.232.0.0/16", "10.231.7.1", "eth0", "10.231.7.2"),
            route("169.254.1.1/32", "", "eth0", ""),
        ],
    )
}

fn expect_failure(result: Result<(), ClientError>, code: Code, needles: &[&str]) {
    let err = result.expect_err("the call must fail");
    assert_eq!(err.rpc_code(), Some(code), "{err}");
    let msg = err.rpc_message().unwrap_or_default();
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in {msg:?}");
    }
}

fn routes(ns: &Netns, family: &str) -> Vec<Value> {
    ns.ip_json(&[family, "route", "show", "table", "main"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn find_route<'a>(routes: &'a [Value], dst: &str) -> &'a Value {
    routes
        .iter()
        .find(|r| r["dst"] == dst)
        .unwrap_or_else(|| panic!("no route to {dst} in {routes:?}"))
}

#[tokio::test]
async fn configures_an_interface_found_by_mac_in_its_namespace() {
    let Some(ns) = Netns::create() else { return };
    ns.ip(&[
        "link", "add", "husk-v0", "address", MAC, "type", "veth", "peer", "name", "husk-v1",
    ]);
    ns.ip(&["link", "set", "husk-v1", "up"]);
    let agent = NetnsAgent::spawn(&ns);
    let client = agent.connect().await;

    // Failures first: each is refused before anything changes.
    expect_failure(
        client
            .configure_network(&request(
                vec![interface(MAC, "eth0", &["10.231.7.2/33"], 0)],
                vec![],
            ))
            .await,
        Code::INVALID_ARGUMENT,
        &["10.231.7.2/33", "prefix length"],
    );
    expect_failure(
        client
            .configure_network(&request(
                vec![interface(
                    "02:00:00:00:00:99",
                    "eth0",
                    &["10.231.7.2/24"],
                    0,
                )],
                vec![],
            ))
            .await,
        Code::NOT_FOUND,
        &["02:00:00:00:00:99", "no interface has this MAC"],
    );
    let link = &ns.ip_json(&["link", "show", "husk-v0"])[0];
    assert_eq!(
        link["ifname"], "husk-v0",
        "a refused request renamed nothing"
    );
    assert!(
        ns.ip_json(&["addr", "show", "husk-v0"])[0]["addr_info"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "a refused request added no address"
    );

    client
        .configure_network(&pod_request())
        .await
        .expect("ConfigureNetwork");

    let lo = &ns.ip_json(&["link", "show", "lo"])[0];
    assert!(
        lo["flags"].as_array().unwrap().contains(&"UP".into()),
        "lo up: {lo}"
    );
    let eth0 = &ns.ip_json(&["addr", "show", "eth0"])[0];
    assert_eq!(
        eth0["address"], MAC,
        "renamed interface is the one with the MAC"
    );
    assert_eq!(eth0["mtu"], 1400);
    assert!(
        eth0["flags"].as_array().unwrap().contains(&"UP".into()),
        "{eth0}"
    );
    let addrs: Vec<String> = eth0["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert!(addrs.contains(&"10.231.7.2/24".to_owned()), "{addrs:?}");
    assert!(addrs.contains(&"fd00:231::2/64".to_owned()), "{addrs:?}");

    let v4 = routes(&ns, "-4");
    let default = find_route(&v4, "default");
    assert_eq!(default["gateway"], "10.231.7.1");
    assert_eq!(default["dev"], "eth0");
    let via_src = find_route(&v4, "10.232.0.0/16");
    assert_eq!(via_src["gateway"], "10.231.7.1");
    assert_eq!(via_src["prefsrc"], "10.231.7.2");
    let link_route = find_route(&v4, "169.254.1.1");
    assert_eq!(link_route["scope"], "link");
    assert!(link_route.get("gateway").is_none(), "{link_route}");
    let v6 = routes(&ns, "-6");
    let default6 = find_route(&v6, "default");
    assert_eq!(default6["gateway"], "fd00:231::1");
    assert_eq!(default6["dev"], "eth0");

    // Again: equal addresses and routes are replaced, not refused.
    client
        .configure_network(&pod_request())
        .await
        .expect("ConfigureNetwork a second time");
    let v4_again = routes(&ns, "-4");
    assert_eq!(v4_again.len(), v4.len(), "{v4_again:?}");

    // Failures that only the kernel or the link table can tell.
    expect_failure(
        client
            .configure_network(&request(
                vec![],
                vec![route("10.240.0.0/16", "", "eth9", "")],
            ))
            .await,
        Code::NOT_FOUND,
        &["route 10.240.0.0/16 dev eth9", "device eth9 not found"],
    );
    expect_failure(
        client
            .configure_network(&request(
                vec![],
                vec![route("10.241.0.0/16", "192.0.2.1", "eth0", "")],
            ))
            .await,
        Code::INVALID_ARGUMENT,
        &["route 10.241.0.0/16 via 192.0.2.1 dev eth0", "ENETUNREACH"],
    );
    // onlink: the same unreachable gateway is accepted as on the link.
    let mut onlink = route("10.241.0.0/16", "192.0.2.1", "eth0", "");
    onlink.onlink = true;
    client
        .configure_network(&request(vec![], vec![onlink]))
        .await
        .expect("onlink route");
    let r = find_route(&routes(&ns, "-4"), "10.241.0.0/16").clone();
    assert!(
        r["flags"].as_array().unwrap().contains(&"onlink".into()),
        "{r}"
    );
}

#[tokio::test]
async fn refused_in_the_hosts_network_namespace() {
    // Runs anywhere: an agent in the test's own namespace is, on a normal host, in the
    // initial one; a test runner inside a container is not, and then there is nothing
    // to check.
    let same = |a: &str, b: &str| {
        let (a, b) = (std::fs::metadata(a), std::fs::metadata(b));
        match (a, b) {
            (Ok(a), Ok(b)) => {
                use std::os::unix::fs::MetadataExt;
                Some((a.dev(), a.ino()) == (b.dev(), b.ino()))
            }
            _ => None,
        }
    };
    if same("/proc/self/ns/net", "/proc/1/ns/net") == Some(false) {
        eprintln!("skipping: this test runs outside the initial network namespace");
        return;
    }
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    expect_failure(
        client.configure_network(&pod_request()).await,
        Code::FAILED_PRECONDITION,
        &["host test mode", "network namespace"],
    );
}

/// A VM restored from a template still has the template's NIC address: the request names
/// it as `current_mac`, and the interface gets the pod's.
#[tokio::test]
async fn a_template_nic_is_found_by_its_current_mac_and_given_the_pods() {
    const TEMPLATE_MAC: &str = "02:48:55:53:4b:77";
    let Some(ns) = Netns::create() else { return };
    ns.ip(&[
        "link",
        "add",
        "husk-t0",
        "address",
        TEMPLATE_MAC,
        "type",
        "veth",
        "peer",
        "name",
        "husk-t1",
    ]);
    ns.ip(&["link", "set", "husk-t0", "up"]);
    let agent = NetnsAgent::spawn(&ns);
    let client = agent.connect().await;
    let mut iface = interface(MAC, "eth0", &["10.231.9.2/24"], 0);
    iface.current_mac = TEMPLATE_MAC.into();
    client
        .configure_network(&request(vec![iface], vec![]))
        .await
        .expect("ConfigureNetwork with current_mac");
    let eth0 = &ns.ip_json(&["addr", "show", "eth0"])[0];
    assert_eq!(
        eth0["address"], MAC,
        "the pod's MAC replaced the template's"
    );
    assert!(
        eth0["flags"].as_array().unwrap().contains(&"UP".into()),
        "{eth0}"
    );
    let bad = {
        let mut i = interface(MAC, "eth1", &[], 0);
        i.current_mac = "nope".into();
        i
    };
    expect_failure(
        client.configure_network(&request(vec![bad], vec![])).await,
        Code::INVALID_ARGUMENT,
        &["current MAC"],
    );
}
