//! PodNetwork against a real kernel: a throwaway "pod" namespace with a veth whose peer
//! is in a second throwaway namespace (the "node"), as CNI would leave it. Needs root,
//! iproute2 and /dev/net/tun; skips with the reason otherwise.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_vmm::devices::virtio::net::Tap;

use super::*;

/// A named network namespace, deleted on drop (with every interface in it).
struct Netns {
    name: String,
}

impl Netns {
    fn create(role: &str) -> Netns {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("husk-test-{role}-{}-{nanos:x}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn tc(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("tc", &all)
    }

    fn link(&self, name: &str) -> serde_json::Value {
        let out = self.ip(&["-j", "link", "show", name]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
    }

    fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", name])
            .output()
            .unwrap()
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why this host cannot run the namespace tests, if it cannot.
fn cannot_run() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces and taps need root");
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun");
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some("no iproute2 (`ip`, `tc`) on this host");
        }
    }
    None
}

fn mac_bytes(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// Reads frames (after the 12-byte virtio-net header) from the non-blocking tap until
/// `want` accepts one or `timeout` passes.
fn read_tap_until(tap: &mut File, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match tap.read(&mut buf) {
            Ok(n) if n > 12 && want(&buf[12..n]) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
    false
}

/// A raw packet socket on `ifname`, made in the namespace at `netns`.
fn packet_socket(netns: &Path, ifname: &str) -> OwnedFd {
    let ifname = ifname.to_owned();
    netns::run_in(netns, move || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: cname is NUL-terminated.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(index > 0);
        // SAFETY: zeroed sockaddr_ll is valid; the fields set below are what bind needs.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of this size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(fd)
    })
    .unwrap()
}

/// Receives on a packet socket until `want` accepts a frame or `timeout` passes.
fn recv_until(fd: &OwnedFd, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 && want(&buf[..n as usize]) {
            return true;
        }
    }
    false
}

const POD_MAC: &str = "02:48:55:53:4b:02";
/// IEEE local experimental EtherType: nothing on the peer answers or eats it.
const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

#[test]
fn mirrors_the_pod_interface_through_a_tap() {
    if let Some(why) = cannot_run() {
        eprintln!("skipping: {why}");
        return;
    }
    let x = (std::process::id() % 200 + 20).to_string();
    let (pod_ip, node_ip) = (format!("10.231.{x}.2"), format!("10.231.{x}.1"));
    let pod = Netns::create("pod");
    let node = Netns::create("node");
    pod.ip(&[
        "link",
        "add",
        "eth0",
        "address",
        POD_MAC,
        "mtu",
        "1450",
        "type",
        "veth",
        "peer",
        "name",
        "husk-node",
        "mtu",
        "1450",
        "netns",
        &node.name,
    ]);
    pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["link", "set", "lo", "up"]);
    pod.ip(&["route", "add", "default", "via", &node_ip]);
    node.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", "husk-node"]);
    node.ip(&["link", "set", "husk-node", "up"]);
    let node_mac = node.link("husk-node")["address"]
        .as_str()
        .unwrap()
        .to_owned();

    let net = PodNetwork::setup(&pod.path()).expect("setup");

    // The guest configuration is the pod interface's.
    let g = &net.guest;
    assert_eq!(g.interfaces.len(), 1);
    assert_eq!(g.interfaces[0].mac, POD_MAC);
    assert_eq!(g.interfaces[0].name, "eth0");
    assert_eq!(g.interfaces[0].mtu, 1450);
    assert_eq!(g.interfaces[0].addresses, [format!("{pod_ip}/24")]);
    let routes: Vec<(&str, &str, &str)> = g
        .routes
        .iter()
        .map(|r| {
            (
                r.destination.as_str(),
                r.gateway.as_str(),
                r.device.as_str(),
            )
        })
        .collect();
    // The subnet route is the kernel's (the guest's kernel makes its own).
    assert_eq!(routes, [("0.0.0.0/0", node_ip.as_str(), "eth0")]);
    assert_eq!(
        net.net_arg(),
        format!("tap=tap0_husk,mac={POD_MAC},netns={}", pod.path().display())
    );

    // The tap: up, the pod interface's MTU; a redirect each way.
    let tap_link = pod.link(TAP_NAME);
    assert_eq!(tap_link["mtu"], 1450);
    assert!(
        tap_link["flags"].as_array().unwrap().contains(&"UP".into()),
        "{tap_link}"
    );
    let tap_index = tap_link["ifindex"].as_u64().unwrap() as u32;
    let eth0_index = pod.link("eth0")["ifindex"].as_u64().unwrap() as u32;
    let (from_eth0, from_tap) = netns::run_in(&pod.path(), move || {
        let mut rtnl = Rtnl::open()?;
        Ok((
            mirror::redirect_targets(&mut rtnl, eth0_index)?,
            mirror::redirect_targets(&mut rtnl, tap_index)?,
        ))
    })
    .unwrap();
    assert_eq!(from_eth0, [tap_index]);
    assert_eq!(from_tap, [eth0_index]);
    let shown = pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        shown.contains("mirred") && shown.contains("Redirect to device tap0_husk"),
        "{shown}"
    );

    // Traffic crosses both ways, attached the way the VMM attaches (from outside the
    // namespace, virtio-net header in front of each frame).
    let mut tap = Tap::open_in_netns(TAP_NAME, &pod.path())
        .expect("the VMM's attach")
        .into_file();
    // Node to pod: the node's ARP request for the pod IP comes out of the tap.
    let node_path = node.path();
    let target = pod_ip.clone();
    netns::run_in(&node_path, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.send_to(b"hello pod", (target.as_str(), 9))?;
        Ok(())
    })
    .unwrap();
    let pod_ip_bytes = pod_ip.parse::<std::net::Ipv4Addr>().unwrap().octets();
    let node_mac_bytes = mac_bytes(&node_mac);
    assert!(
        read_tap_until(&mut tap, Duration::from_secs(10), |f| {
            f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[6..12] == node_mac_bytes
                && f[38..42] == pod_ip_bytes
        }),
        "the node's ARP request for {pod_ip} did not come out of the tap"
    );

    // Pod (guest) to node: a frame written to the tap leaves through eth0.
    let sock = packet_socket(&node_path, "husk-node");
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0u8; 12]); // virtio-net header: no offloads
    frame.extend_from_slice(&node_mac_bytes);
    frame.extend_from_slice(&mac_bytes(POD_MAC));
    frame.extend_from_slice(&TEST_ETHERTYPE);
    frame.extend_from_slice(b"husk pod network test");
    frame.resize(12 + 60, 0);
    tap.write_all(&frame).expect("write a frame to the tap");
    assert!(
        recv_until(&sock, Duration::from_secs(10), |f| {
            f.len() >= 35 && f[12..14] == TEST_ETHERTYPE && &f[14..35] == b"husk pod network test"
        }),
        "the frame written to the tap did not reach the node"
    );
    drop(tap);

    // Teardown removes the tap and our filters and qdisc, and can run again.
    net.teardown().expect("teardown");
    assert!(!pod.has_link(TAP_NAME));
    assert_eq!(
        pod.tc(&["filter", "show", "dev", "eth0", "ingress"]).trim(),
        ""
    );
    assert!(
        !pod.tc(&["qdisc", "show", "dev", "eth0"])
            .contains("ingress"),
        "ingress qdisc left"
    );
    assert!(pod.has_link("eth0"), "the pod's interface stays");
    net.teardown().expect("second teardown");
    let path = pod.path();
    drop(pod);
    assert!(!path.exists());
    net.teardown().expect("teardown once the namespace is gone");
}

#[test]
fn setup_errors_name_the_namespace() {
    let err = PodNetwork::setup(Path::new("/var/run/netns/a,b")).unwrap_err();
    assert!(format!("{err:#}").contains("without commas"), "{err:#}");
    if let Some(why) = cannot_run() {
        eprintln!("skipping the rest: {why}");
        return;
    }
    let missing = Path::new("/var/run/netns/husk-test-does-not-exist");
    let err = format!("{:#}", PodNetwork::setup(missing).unwrap_err());
    assert!(err.contains("husk-test-does-not-exist"), "{err}");

    let empty = Netns::create("empty");
    let err = format!("{:#}", PodNetwork::setup(&empty.path()).unwrap_err());
    assert!(err.contains(&empty.name), "{err}");
    assert!(
        err.contains("no network interface with an address"),
        "{err}"
    );
    assert!(!empty.has_link(TAP_NAME));
}
