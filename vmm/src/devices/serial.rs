//! COM1: a 16550A UART (vm-superio) at port 0x3f8, IRQ 4, transmit-only from the VMM's
//! point of view. Output goes to stdout, a file or nowhere (`--console`).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the UART's IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub type ConsoleWriter = Box<dyn Write + Send>;

/// The UART on the port-I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// The UART's registers for a snapshot (the guest driver's interrupt enables must
    /// survive, or its tty would wait for a transmit interrupt that never comes).
    pub fn state(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART with the registers of a snapshot.
    pub fn from_state(
        state: &SerialSnapshot,
        irq: EventFd,
        out: ConsoleWriter,
    ) -> Result<Self, String> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&s, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self { serial })
    }
}

/// vm-superio's `SerialState`, in a form the snapshot file can hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has eight byte-wide registers; wider or out-of-range reads see zeros.
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A failed write to the console or irqfd must not take the guest down.
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::trace!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_the_irq_when_enabled() {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        // Enable the THR-empty interrupt (IER bit 1), then send "hi".
        dev.write(1, &[0x02]);
        assert_eq!(
            irq.read().unwrap(),
            1,
            "enabling THRE with an empty THR interrupts"
        );
        let mut iir = [0u8];
        dev.read(2, &mut iir); // reading IIR acknowledges it
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert!(irq.read().unwrap() >= 1, "THR empty interrupt raised");
        // LSR says the transmitter is empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Wider accesses and offsets past the registers are ignored.
        dev.write(0, b"xy");
        dev.write(9, b"z");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
    }
}
