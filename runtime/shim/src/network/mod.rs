//! A pod's network in the VM (Kata's "tcfilter" model). CNI gave the pod's network
//! namespace an interface (usually a veth, eth0) with the pod's IP. In that namespace the
//! shim adds a tap and mirrors every frame between the two with tc redirects; the VMM
//! (which stays in the host's namespace) attaches the tap as the guest's virtio-net NIC;
//! the agent gives that NIC the pod interface's MAC, addresses, MTU and routes. The pod's
//! IP then answers from inside the guest.
//!
//! - `netns`: work on a thread that entered the pod's namespace;
//! - `rtnl`: a synchronous rtnetlink socket (netlink-packet-route messages);
//! - `inspect`: reading the namespace and making the guest's configuration;
//! - `tap`: the persistent tap; `mirror`: the tc qdiscs and redirect filters;
//! - `dns`: the pod's resolv.conf for the guest;
//! - here: [`PodNetwork`], what the shim's service calls.
//!
//! netlink rather than `ip`/`tc`: no dependency on the node's iproute2 version or its
//! output format, errors come back as errnos, and each step is one round trip.

pub mod dns;
mod inspect;
mod mirror;
mod netns;
mod rtnl;
mod tap;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use husk_protocol::agent::ConfigureNetworkRequest;
use husk_protocol::client::AgentClient;

use inspect::{LinkInfo, Snapshot, format_mac};
use rtnl::Rtnl;

/// The tap's name in the pod's namespace (one per namespace).
pub const TAP_NAME: &str = "tap0_husk";

/// The pod's network as set up on the host side, and the guest configuration to apply.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    /// The CNI interface (index and name in the pod's namespace).
    pod_link: LinkInfo,
    tap: String,
    /// Whether the pod interface's ingress qdisc is ours to remove.
    pod_qdisc_ours: bool,
    /// The ConfigureNetwork request for the guest (interface by MAC, renamed eth0; its
    /// addresses, MTU and routes). DNS is not in it: CreateSandbox carries resolv.conf.
    guest: ConfigureNetworkRequest,
}

impl PodNetwork {
    /// In the network namespace at `netns_path`: finds the pod's interface, reads its
    /// configuration, creates the tap (same MTU, up) and the redirects both ways.
    /// Undoes its own steps when one fails. Blocking (a few netlink round trips).
    pub fn setup(netns_path: &Path) -> anyhow::Result<PodNetwork> {
        let netns = std::path::absolute(netns_path)
            .with_context(|| format!("network namespace path {}", netns_path.display()))?;
        // It travels in the VMM's comma-separated --net value.
        if netns.to_str().is_none_or(|s| s.contains(',')) {
            bail!(
                "network namespace path {} must be UTF-8 without commas",
                netns.display()
            );
        }
        let ns = netns.clone();
        netns::run_in(&netns, move || setup_inside(ns))
    }

    /// The VMM's `--net` value: the tap, the guest MAC (the pod interface's) and the
    /// namespace the tap is in.
    pub fn net_arg(&self) -> String {
        format!(
            "tap={},mac={},netns={}",
            self.tap,
            self.mac(),
            self.netns.display()
        )
    }

    /// The guest NIC's MAC: the pod interface's.
    pub fn mac(&self) -> String {
        self.pod_link
            .mac
            .map(|m| format_mac(&m))
            .unwrap_or_default()
    }

    /// Sends the guest configuration to the agent of the booted VM. `current_mac`: the
    /// MAC the guest NIC has now, when the VM was restored from a template whose NIC had it.
    pub async fn configure_guest(
        &self,
        client: &AgentClient,
        current_mac: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut req = self.guest.clone();
        if let Some(mac) = current_mac {
            for iface in &mut req.interfaces {
                iface.current_mac = mac.to_owned();
            }
        }
        client
            .configure_network(&req)
            .await
            .with_context(|| format!("configuring the guest NIC {}", self.mac()))
    }

    /// Deletes the tap and the redirects. Idempotent: what is already gone (the
    /// namespace included) is no error.
    pub fn teardown(&self) -> anyhow::Result<()> {
        let (link, tap, qdisc_ours) =
            (self.pod_link.clone(), self.tap.clone(), self.pod_qdisc_ours);
        let result = netns::run_in(&self.netns, move || {
            let mut rtnl = Rtnl::open().context("netlink socket")?;
            remove_inside(&mut rtnl, &link, &tap, qdisc_ours)
        });
        match result {
            Err(e)
                if e.downcast_ref::<netns::EnterError>()
                    .is_some_and(|e| e.is_gone()) =>
            {
                Ok(())
            }
            r => r.with_context(|| format!("removing the pod network in {}", self.netns.display())),
        }
    }
}

/// [`PodNetwork::setup`] on the thread inside the namespace.
fn setup_inside(netns: PathBuf) -> anyhow::Result<PodNetwork> {
    let mut rtnl = Rtnl::open().context("netlink socket")?;
    let snapshot = Snapshot::read(&mut rtnl).context("reading links, addresses and routes")?;
    let pod_link = snapshot.pod_interface(TAP_NAME).cloned().ok_or_else(|| {
        anyhow!(
            "no network interface with an address in {} (only: {})",
            netns.display(),
            snapshot
                .links
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let guest = snapshot.guest_request(&pod_link);

    tap::create_persistent(TAP_NAME).with_context(|| format!("creating tap {TAP_NAME}"))?;
    let mut net = PodNetwork {
        netns,
        pod_link,
        tap: TAP_NAME.to_owned(),
        pod_qdisc_ours: false,
        guest,
    };
    match connect(&mut rtnl, &mut net) {
        Ok(()) => {
            tracing::info!(
                netns = %net.netns.display(), interface = %net.pod_link.name,
                mac = %net.mac(), tap = %net.tap, "pod network mirrored to the tap"
            );
            Ok(net)
        }
        Err(e) => {
            if let Err(undo) = remove_inside(&mut rtnl, &net.pod_link, &net.tap, net.pod_qdisc_ours)
            {
                tracing::warn!("undoing a failed pod network setup: {undo:#}");
            }
            Err(e)
        }
    }
}

/// Tap up with the pod interface's MTU, qdiscs, redirects both ways.
fn connect(rtnl: &mut Rtnl, net: &mut PodNetwork) -> anyhow::Result<()> {
    let tap = link_index(rtnl, &net.tap)?
        .ok_or_else(|| anyhow!("tap {} vanished after its creation", net.tap))?;
    let pod = net.pod_link.index;
    let pod_name = net.pod_link.name.clone();
    let mtu = (net.pod_link.mtu > 0).then_some(net.pod_link.mtu);
    tap::set_mtu_and_up(rtnl, tap, mtu)
        .with_context(|| format!("bringing tap {} up (MTU {mtu:?})", net.tap))?;
    net.pod_qdisc_ours = mirror::add_ingress_qdisc(rtnl, pod)
        .with_context(|| format!("adding an ingress qdisc to {pod_name}"))?;
    mirror::add_ingress_qdisc(rtnl, tap)
        .with_context(|| format!("adding an ingress qdisc to {}", net.tap))?;
    // A filter of ours left by an earlier shim would redirect twice.
    mirror::remove(rtnl, pod, false)
        .with_context(|| format!("clearing old filters of {pod_name}"))?;
    mirror::add_redirect(rtnl, pod, tap)
        .with_context(|| format!("redirecting {pod_name} ingress to {}", net.tap))?;
    mirror::add_redirect(rtnl, tap, pod)
        .with_context(|| format!("redirecting {} ingress to {pod_name}", net.tap))?;
    Ok(())
}

/// Removes the redirect from the pod interface (and its qdisc if ours) and the tap (its
/// own qdisc and filter go with it).
fn remove_inside(
    rtnl: &mut Rtnl,
    pod_link: &LinkInfo,
    tap: &str,
    pod_qdisc_ours: bool,
) -> anyhow::Result<()> {
    // The index is only trusted while it still names the pod's interface.
    if link_index(rtnl, &pod_link.name)? == Some(pod_link.index) {
        mirror::remove(rtnl, pod_link.index, pod_qdisc_ours)
            .with_context(|| format!("removing the redirect from {}", pod_link.name))?;
    }
    if let Some(index) = link_index(rtnl, tap)? {
        match tap::delete_link(rtnl, index) {
            Err(e) if !mirror::is_gone(&e) => {
                return Err(e).with_context(|| format!("deleting tap {tap}"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn link_index(rtnl: &mut Rtnl, name: &str) -> anyhow::Result<Option<u32>> {
    let links = Snapshot::links_only(rtnl).context("listing links")?;
    Ok(links.iter().find(|l| l.name == name).map(|l| l.index))
}
