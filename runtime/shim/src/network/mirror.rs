//! Mirroring the pod interface and the tap with tc (the "tcfilter" model): an ingress
//! qdisc on each, and on each a u32 filter that matches every frame and redirects it to
//! the other's egress (`tc filter add dev A ingress protocol all u32 match u32 0 0
//! action mirred egress redirect dev B`). Frames pass unchanged, so the guest NIC, which
//! has the pod interface's MAC, is on the pod's network as that interface was.

use std::io;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};

use super::rtnl::Rtnl;

/// The ingress qdisc's handle, ffff:.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// Our filters' preference: distinctive, so teardown deletes ours and nothing else.
pub const FILTER_PRIO: u16 = 0x4855;

/// ETH_P_ALL as tcm_info carries it (network byte order).
fn protocol_all() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = INGRESS_HANDLE;
    msg.attributes.push(TcAttribute::Kind("ingress".into()));
    msg
}

fn our_filters(index: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = INGRESS_HANDLE;
    msg.header.info = (u32::from(FILTER_PRIO) << 16) | u32::from(protocol_all());
    msg
}

/// Adds the ingress qdisc to link `index`; `false` when it had one already (which is
/// then shared, and left in place by [`remove`]).
pub fn add_ingress_qdisc(rtnl: &mut Rtnl, index: u32) -> io::Result<bool> {
    match rtnl.request(
        RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Redirects every frame arriving on link `from` to the egress of link `to`.
pub fn add_redirect(rtnl: &mut Rtnl, from: u32, to: u32) -> io::Result<()> {
    // One key that matches anything: mask 0 at offset 0.
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];

    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];

    let mut msg = our_filters(from);
    msg.attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.into()));
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    rtnl.request(
        RouteNetlinkMessage::NewTrafficFilter(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// The links that link `index`'s ingress filters of [`FILTER_PRIO`] redirect to.
#[cfg(test)]
pub fn redirect_targets(rtnl: &mut Rtnl, index: u32) -> io::Result<Vec<u32>> {
    let mut query = TcMessage::with_index(index as i32);
    query.header.parent = INGRESS_HANDLE;
    let replies = rtnl.dump(RouteNetlinkMessage::GetTrafficFilter(query))?;
    let mut targets = Vec::new();
    for reply in replies {
        let RouteNetlinkMessage::NewTrafficFilter(f) = reply else {
            continue;
        };
        if (f.header.info >> 16) as u16 != FILTER_PRIO {
            continue;
        }
        for attr in &f.attributes {
            let TcAttribute::Options(opts) = attr else {
                continue;
            };
            for opt in opts {
                let TcOption::U32(TcFilterU32Option::Action(actions)) = opt else {
                    continue;
                };
                for action in actions {
                    for a in &action.attributes {
                        let TcActionAttribute::Options(aopts) = a else {
                            continue;
                        };
                        for o in aopts {
                            if let TcActionOption::Mirror(TcActionMirrorOption::Parms(m)) = o
                                && m.eaction == TcMirrorActionType::EgressRedir
                            {
                                targets.push(m.ifindex);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(targets)
}

/// Removes our filters from link `index`, and its ingress qdisc when we added it.
/// What is already gone is no error.
pub fn remove(rtnl: &mut Rtnl, index: u32, qdisc_ours: bool) -> io::Result<()> {
    ignore_gone(rtnl.request(RouteNetlinkMessage::DelTrafficFilter(our_filters(index)), 0))?;
    if qdisc_ours {
        ignore_gone(rtnl.request(
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
            0,
        ))?;
    }
    Ok(())
}

/// "Already gone" as the kernel says it for links, qdiscs and filters.
pub fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)
    )
}

fn ignore_gone(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if is_gone(&e) => Ok(()),
        r => r,
    }
}
