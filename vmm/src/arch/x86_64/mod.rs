//! x86_64 direct boot: the guest physical layout, the structures a 64-bit Linux kernel
//! expects to find when it is entered without firmware, and the initial vCPU state.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod page_walk;
pub mod paging;
pub mod regs;
