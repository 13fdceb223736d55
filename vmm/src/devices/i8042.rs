//! The part of an i8042 keyboard controller a guest needs to reboot: with `reboot=k`,
//! Linux writes command 0xFE (pulse the reset line) to port 0x64. husk treats that as the
//! guest asking to stop. The controller reports "no data, input buffer empty" so that
//! the kernel's wait for the input buffer before the command never spins.

use super::bus::BusDevice;

const DATA_OFFSET: u64 = 0; // port 0x60
const COMMAND_OFFSET: u64 = 4; // port 0x64
const CMD_RESET_CPU: u8 = 0xfe;

/// What the device calls when the guest pulses the reset line.
pub type ResetCallback = Box<dyn Fn() + Send>;

pub struct I8042 {
    on_reset: ResetCallback,
}

impl I8042 {
    pub fn new(on_reset: ResetCallback) -> Self {
        Self { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status (0x64) = 0: output buffer empty, input buffer empty. Data (0x60) = 0.
        if matches!(offset, DATA_OFFSET | COMMAND_OFFSET) {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn only_reset_command_on_the_command_port_triggers() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let mut dev = I8042::new(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(DATA_OFFSET, &[0xfe]);
        dev.write(COMMAND_OFFSET, &[0xad]);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0], "input buffer empty");
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
