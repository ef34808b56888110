//! The Linux I2C bus (`/dev/i2c-N`, the `i2c-dev` interface) for the
//! sensor drivers, through `linux-embedded-hal`.
//!
//! Linux I2C adapters report a missing device differently: the kernel's
//! documented code is `ENXIO`, but common adapters (the Raspberry Pi's
//! `i2c-bcm2835` among them) return `EREMOTEIO`. [`LinuxI2c`] reports
//! both as a NACK so a disconnected sensor reads as "not responding".

use std::path::Path;

use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};
use linux_embedded_hal::I2cdev;

use super::SensorError;

const EREMOTEIO: i32 = 121;

/// An I2C bus device with NACKs reported uniformly.
pub struct LinuxI2c(I2cdev);

/// A Linux I2C error with its HAL kind.
#[derive(Debug)]
pub struct LinuxI2cError(linux_embedded_hal::I2CError);

impl embedded_hal::i2c::Error for LinuxI2cError {
    fn kind(&self) -> ErrorKind {
        let errno = match self.0.inner() {
            i2cdev::linux::LinuxI2CError::Errno(e) => Some(*e),
            i2cdev::linux::LinuxI2CError::Io(e) => e.raw_os_error(),
        };
        if errno == Some(EREMOTEIO) {
            return ErrorKind::NoAcknowledge(NoAcknowledgeSource::Unknown);
        }
        self.0.kind()
    }
}

impl ErrorType for LinuxI2c {
    type Error = LinuxI2cError;
}

impl I2c for LinuxI2c {
    fn transaction(
        &mut self,
        address: u8,
        operations: &mut [Operation<'_>],
    ) -> Result<(), Self::Error> {
        self.0
            .transaction(address, operations)
            .map_err(LinuxI2cError)
    }
}

/// Open a bus device such as `/dev/i2c-1`, with a clear error when it is
/// missing or not accessible.
pub fn open(path: &Path) -> Result<LinuxI2c, SensorError> {
    // i2cdev opens the file lazily for some operations; check it exists
    // first so the error names the real problem.
    if let Err(source) = std::fs::metadata(path) {
        let hint = if source.kind() == std::io::ErrorKind::NotFound {
            " (is I2C enabled and the i2c-dev module loaded? `modprobe i2c-dev`; `ls /dev/i2c-*` lists the buses)"
        } else {
            ""
        };
        return Err(SensorError::Open {
            path: path.to_path_buf(),
            source,
            hint,
        });
    }
    let dev = I2cdev::new(path).map_err(|e| {
        let source = match e {
            i2cdev::linux::LinuxI2CError::Io(e) => e,
            i2cdev::linux::LinuxI2CError::Errno(n) => std::io::Error::from_raw_os_error(n),
        };
        let hint = if source.kind() == std::io::ErrorKind::PermissionDenied {
            " (add the user to the `i2c` group, or run with access to the device)"
        } else {
            ""
        };
        SensorError::Open {
            path: path.to_path_buf(),
            source,
            hint,
        }
    })?;
    Ok(LinuxI2c(dev))
}
