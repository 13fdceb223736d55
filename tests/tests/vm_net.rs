//! A real husk VM with a tap-backed virtio-net NIC: traffic between the host side of the
//! tap and the guest kernel's network stack.
//!
//! Everything happens in a throwaway network namespace owned by one test thread (network
//! namespaces are per thread): the tap, its address, the VMM (which inherits the
//! namespace) and the host sockets. Nothing is left on the host when the thread and the
//! VMM are gone. The guest gets its address from the kernel command line (`ip=`, the
//! kernel's CONFIG_IP_PNP), not from the agent, so the guest kernel alone answers: ARP for
//! its address, a TCP RST for a SYN to a closed port, and ICMP echo replies carrying
//! full-size frames back unchanged, which proves frames flow both ways without any guest
//! user space.
//!
//! The same VM then gets a second configuration from its agent (ConfigureNetwork, the
//! pod network's path): the NIC, found by its MAC, is renamed, gets another address and
//! MTU and a route, and the guest kernel answers on that address through that route.
//!
//! Skips without KVM, or when it cannot create a network namespace (not root).
//! `HUSK_TEST_CONSOLE=1` keeps the guest console in the VM's log on failure.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::host::skip_without_kvm;
use husk_tests::{GuestImage, workspace};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const TAP: &str = "husk-vmnet0";
const HOST_IP: &str = "10.200.1.1";
const GUEST_IP: &str = "10.200.1.2";
const GUEST_MAC: &str = "02:48:55:53:4b:01";
/// What ConfigureNetwork gives the NIC: another subnet, and a route to a third one
/// through the host's address on the second.
const HOST_IP2: &str = "10.200.2.1";
const GUEST_IP2: &str = "10.200.2.2";
const HOST_IP3: &str = "10.200.3.1";
const GUEST_IFNAME2: &str = "pod0";
/// How long one exchange with the guest may take. Generous: on nested-PVM hosts the guest
/// kernel sometimes runs the receive path a second or more after the device delivered
/// the frame and raised the interrupt (seen in the device's own timestamps), and TCP
/// retransmits a SYN only after 1 s and 3 s. This is a functional test, not a latency one.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// husk-vmm, killed and reaped on drop (also when an assertion fails).
struct Vmm {
    child: Child,
    dir: PathBuf,
}

impl Vmm {
    fn start(vmm: &Path, image: &GuestImage, dir: &Path, console: bool) -> Vmm {
        let mut cmd = Command::new(vmm);
        cmd.arg("--kernel")
            .arg(&image.kernel)
            .arg("--initramfs")
            .arg(&image.initramfs)
            .args(["--memory-mib", "128"])
            // The agent (init) expects its vsock device; nothing here talks to it.
            .arg("--vsock-uds")
            .arg(dir.join("vsock.sock"))
            .args(["--net", &format!("tap={TAP},mac={GUEST_MAC}")])
            // ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>
            .args([
                "--cmdline",
                &format!("ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"),
            ])
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("vmm.log")).expect("creating the VMM log"),
            ));
        if console {
            cmd.arg("--console")
                .arg(format!("file:{}", dir.join("console.log").display()));
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", vmm.display()));
        Vmm {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read(self.dir.join(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        format!(
            "\n--- husk-vmm stderr ---\n{}\n--- guest console ---\n{}\n",
            self.log("vmm.log"),
            self.log("console.log")
        )
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One TCP connection attempt to a closed guest port: `Ok` when the guest kernel refused
/// it (its RST came back), otherwise what happened instead.
fn refused_by_guest(addr: SocketAddr) -> Result<(), String> {
    match TcpStream::connect_timeout(&addr, EXCHANGE_TIMEOUT) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e.to_string()),
        Ok(_) => Err("connection accepted by a closed port".into()),
    }
}

/// Internet checksum (RFC 1071).
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends an ICMP echo request carrying `payload` to `dst` from a raw socket and returns
/// the payload of the matching echo reply.
fn icmp_echo(dst: Ipv4Addr, seq: u16, payload: &[u8]) -> Result<Vec<u8>, String> {
    let os_err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if raw < 0 {
        return Err(os_err("raw ICMP socket"));
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let timeout = libc::timeval {
        tv_sec: EXCHANGE_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err("SO_RCVTIMEO"));
    }
    let id = std::process::id() as u16;
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend(id.to_be_bytes());
    pkt.extend(seq.to_be_bytes());
    pkt.extend_from_slice(payload);
    let csum = inet_checksum(&pkt);
    pkt[2..4].copy_from_slice(&csum.to_be_bytes());
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `pkt` and `to` are valid for the given lengths during the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent != pkt.len() as isize {
        return Err(os_err("sending the echo request"));
    }
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    while Instant::now() < deadline {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(os_err("waiting for the echo reply"));
        }
        // A raw socket sees every ICMP packet, with its IP header.
        let got = &buf[..n as usize];
        let ihl = usize::from(got[0] & 0x0f) * 4;
        let Some(icmp) = got.get(ihl..) else { continue };
        if icmp.len() >= 8
            && icmp[0] == 0
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(icmp[8..].to_vec());
        }
    }
    Err(format!("no echo reply within {EXCHANGE_TIMEOUT:?}"))
}

/// A TCP connection attempt from the host's `src` address to `dst`: `Ok` when the guest
/// refused it (its RST, sent back to `src`, arrived).
fn refused_from(src: Ipv4Addr, dst: SocketAddr) -> Result<(), String> {
    let os_err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    let SocketAddr::V4(dst) = dst else {
        return Err("IPv4 only".into());
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(os_err("TCP socket"));
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let timeout = libc::timeval {
        tv_sec: EXCHANGE_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    let from = sockaddr(src, 0);
    let to = sockaddr(*dst.ip(), dst.port());
    // SAFETY: the option value and addresses are valid for their lengths during each call.
    unsafe {
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ) != 0
        {
            return Err(os_err("SO_SNDTIMEO"));
        }
        if libc::bind(
            fd.as_raw_fd(),
            (&from as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
        {
            return Err(os_err("binding the source address"));
        }
        if libc::connect(
            fd.as_raw_fd(),
            (&to as *const libc::sockaddr_in).cast(),
            len,
        ) == 0
        {
            return Err("connection accepted by a closed port".into());
        }
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        e => Err(e.to_string()),
    }
}

/// ConfigureNetwork through the VM's agent: the NIC (by MAC) is renamed and gets a second
/// address, an MTU and a route to the host's third subnet.
fn configure_through_the_agent(vsock: &Path) -> Result<(), String> {
    use husk_protocol::agent::{ConfigureNetworkRequest, Interface, Route};
    use husk_protocol::client::{Target, connect_with_retry};

    let mut iface = Interface::new();
    iface.mac = GUEST_MAC.to_uppercase();
    iface.name = GUEST_IFNAME2.into();
    iface.addresses = vec![format!("{GUEST_IP2}/24")];
    iface.mtu = 1400;
    let mut route = Route::new();
    route.destination = "10.200.3.0/24".into();
    route.gateway = HOST_IP2.into();
    route.device = GUEST_IFNAME2.into();
    let mut req = ConfigureNetworkRequest::new();
    req.interfaces = vec![iface];
    req.routes = vec![route];

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client =
            connect_with_retry(&Target::hybrid_vsock(vsock), Instant::now() + BOOT_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
        client
            .configure_network(&req)
            .await
            .map_err(|e| e.to_string())
    })
}

/// The packet count of the tap's "RX:" or "TX:" statistics in `ip -s link show`.
fn link_packets(dir: &str) -> u64 {
    let out = ip(&["-s", "link", "show", "dev", TAP]);
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        if l.trim_start().starts_with(dir) {
            let values = lines.next().unwrap_or_default();
            // bytes packets errors dropped ...
            return values
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

#[test]
fn vm_nic_on_a_tap_talks_to_the_host() {
    if skip_without_kvm("vm_nic_on_a_tap_talks_to_the_host") {
        return;
    }
    let image = GuestImage::locate_or_build().expect("guest image");
    let vmm = workspace::binary("husk-vmm").expect("husk-vmm binary");
    let dir = tempfile::Builder::new()
        .prefix("husk-vm-net-")
        .tempdir()
        .expect("temp dir");
    let dir_path = dir.path().to_path_buf();
    let console = std::env::var_os("HUSK_TEST_CONSOLE").is_some();

    let ran = std::thread::spawn(move || {
        // SAFETY: a plain syscall affecting only this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "SKIPPED vm_nic_on_a_tap_talks_to_the_host: cannot create a network \
                 namespace: {}",
                std::io::Error::last_os_error()
            );
            return false;
        }
        ip(&["link", "set", "lo", "up"]);
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        ip(&["link", "set", TAP, "up"]);

        let vm = Vmm::start(&vmm, &image, &dir_path, console);
        let guest: SocketAddr = format!("{GUEST_IP}:9").parse().unwrap();

        // The guest configures eth0 late in its boot; until then the host's ARP requests
        // go unanswered and connecting fails with "no route to host" or a timeout.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while let Err(last) = refused_by_guest(guest) {
            assert!(
                Instant::now() < deadline,
                "the guest never answered on {GUEST_IP} (last: {last}){}",
                vm.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(500));
        }

        // The host learnt the guest's address from the guest's ARP reply: the MAC the VMM
        // put in the device's config space.
        let neigh = ip(&["neigh", "show", GUEST_IP, "dev", TAP]);
        assert!(
            neigh.contains(GUEST_MAC),
            "neighbour entry {neigh:?} lacks {GUEST_MAC}"
        );

        // Repeated round trips work, not just the first.
        for i in 0..20 {
            refused_by_guest(guest)
                .unwrap_or_else(|e| panic!("round trip {i}: {e}{}", vm.diagnostics()));
        }
        // Full-size frames (1500-byte IP packets) come back intact.
        for seq in 0..10u16 {
            let payload: Vec<u8> = (0..1472u32)
                .map(|i| (i.wrapping_mul(7) + u32::from(seq)) as u8)
                .collect();
            let echoed = icmp_echo(GUEST_IP.parse().unwrap(), seq, &payload)
                .unwrap_or_else(|e| panic!("ping {seq}: {e}{}", vm.diagnostics()));
            assert!(echoed == payload, "ping {seq}: payload changed on the way");
        }
        assert!(
            link_packets("RX:") >= 31,
            "frames from the guest on the tap"
        );
        assert!(link_packets("TX:") >= 31, "frames to the guest on the tap");

        // The agent's path: the reply to HOST_IP3 needs the route it adds (renaming took
        // the link down, which dropped the command line's routes).
        ip(&["addr", "add", &format!("{HOST_IP2}/24"), "dev", TAP]);
        ip(&["addr", "add", &format!("{HOST_IP3}/24"), "dev", TAP]);
        configure_through_the_agent(&dir_path.join("vsock.sock"))
            .unwrap_or_else(|e| panic!("ConfigureNetwork: {e}{}", vm.diagnostics()));
        let guest2: SocketAddr = format!("{GUEST_IP2}:9").parse().unwrap();
        let deadline = Instant::now() + EXCHANGE_TIMEOUT * 3;
        while let Err(last) = refused_from(HOST_IP3.parse().unwrap(), guest2) {
            assert!(
                Instant::now() < deadline,
                "the guest never answered {HOST_IP3} on {GUEST_IP2} (last: {last}){}",
                vm.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let neigh = ip(&["neigh", "show", GUEST_IP2, "dev", TAP]);
        assert!(
            neigh.contains(GUEST_MAC),
            "neighbour entry {neigh:?} lacks {GUEST_MAC}"
        );

        let log = vm.log("vmm.log");
        assert!(
            log.contains("virtio-net device") && log.contains(GUEST_MAC),
            "VMM did not report the NIC: {log}"
        );
        assert!(
            !log.lines()
                .any(|l| l.contains("WARN") && l.contains("virtio-net")),
            "the VMM warned while moving frames:{}",
            vm.diagnostics()
        );
        true
    })
    .join()
    .expect("the network-namespace thread panicked (see above)");
    if ran {
        assert!(
            !ip(&["link", "show"]).contains(TAP),
            "the tap leaked into the host's namespace"
        );
    }
}
