//! InvenSense MPU-6050 over I2C, from the register map (RM-MPU-6000A,
//! revision 4.2): 3-axis accelerometer and 3-axis gyroscope.
//!
//! Bring-up: read `WHO_AM_I` (0x75, must be 0x68 whatever the AD0 pin),
//! wake the chip with the gyro-X PLL as clock (`PWR_MGMT_1` = 0x01), set
//! the sample-rate divider, the digital low-pass filter, then the gyro and
//! accelerometer full-scale ranges. A reading is one 14-byte burst from
//! `ACCEL_XOUT_H` (0x3B): accel x/y/z, temperature, gyro x/y/z, each a
//! big-endian i16, so the seven values come from the same sampling
//! instant.

use embedded_hal::i2c::I2c;

use super::{Imu, ImuSample, STANDARD_GRAVITY_MPS2, SensorError, with_retries};

/// Address with AD0 low (the usual breakout default).
pub const ADDR_AD0_LOW: u8 = 0x68;
/// Address with AD0 high.
pub const ADDR_AD0_HIGH: u8 = 0x69;

/// Register addresses used by the driver.
pub mod reg {
    pub const SMPLRT_DIV: u8 = 0x19;
    pub const CONFIG: u8 = 0x1A;
    pub const GYRO_CONFIG: u8 = 0x1B;
    pub const ACCEL_CONFIG: u8 = 0x1C;
    pub const ACCEL_XOUT_H: u8 = 0x3B;
    pub const PWR_MGMT_1: u8 = 0x6B;
    pub const WHO_AM_I: u8 = 0x75;
}

/// What `WHO_AM_I` holds on an MPU-6050.
pub const WHO_AM_I_VALUE: u8 = 0x68;
/// `PWR_MGMT_1`: SLEEP cleared, clock = PLL with the X-axis gyro reference
/// (the datasheet's recommended clock source).
pub const PWR_MGMT_1_WAKE_PLL_X: u8 = 0x01;
/// Bytes in one burst read: accel (6), temperature (2), gyro (6).
pub const BURST_BYTES: usize = 14;

/// Accelerometer full scale (`ACCEL_CONFIG.AFS_SEL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelRange {
    G2,
    G4,
    G8,
    G16,
}

impl AccelRange {
    /// `AFS_SEL`, bits 4:3 of `ACCEL_CONFIG`.
    pub fn afs_sel(self) -> u8 {
        match self {
            AccelRange::G2 => 0,
            AccelRange::G4 => 1,
            AccelRange::G8 => 2,
            AccelRange::G16 => 3,
        }
    }

    /// Sensitivity, LSB per g.
    pub fn lsb_per_g(self) -> f32 {
        16384.0 / f32::from(1u8 << self.afs_sel())
    }
}

/// Gyroscope full scale (`GYRO_CONFIG.FS_SEL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GyroRange {
    Dps250,
    Dps500,
    Dps1000,
    Dps2000,
}

impl GyroRange {
    /// `FS_SEL`, bits 4:3 of `GYRO_CONFIG`.
    pub fn fs_sel(self) -> u8 {
        match self {
            GyroRange::Dps250 => 0,
            GyroRange::Dps500 => 1,
            GyroRange::Dps1000 => 2,
            GyroRange::Dps2000 => 3,
        }
    }

    /// Sensitivity, LSB per degree/s (131, 65.5, 32.8, 16.4).
    pub fn lsb_per_dps(self) -> f32 {
        match self {
            GyroRange::Dps250 => 131.0,
            GyroRange::Dps500 => 65.5,
            GyroRange::Dps1000 => 32.8,
            GyroRange::Dps2000 => 16.4,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub accel_range: AccelRange,
    pub gyro_range: GyroRange,
    /// `CONFIG.DLPF_CFG` (0..=6): 3 is 44 Hz accel / 42 Hz gyro bandwidth,
    /// enough for human activity sampled at 50-100 Hz.
    pub dlpf_cfg: u8,
    /// `SMPLRT_DIV`: internal sample rate = 1 kHz / (1 + div) with the
    /// low-pass filter on. 9 gives 100 Hz.
    pub sample_rate_div: u8,
    /// Tries per bus operation before giving up (at least 1).
    pub attempts_max: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            accel_range: AccelRange::G4,
            gyro_range: GyroRange::Dps500,
            dlpf_cfg: 3,
            sample_rate_div: 9,
            attempts_max: 3,
        }
    }
}

/// One decoded burst.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    pub sample: ImuSample,
    /// Die temperature, degrees Celsius.
    pub temperature_c: f32,
}

/// Decode a 14-byte burst from `ACCEL_XOUT_H` with the given ranges.
pub fn decode(raw: &[u8; BURST_BYTES], accel: AccelRange, gyro: GyroRange) -> Reading {
    let word = |i: usize| f32::from(i16::from_be_bytes([raw[2 * i], raw[2 * i + 1]]));
    let a = STANDARD_GRAVITY_MPS2 / accel.lsb_per_g();
    let g = 1.0 / gyro.lsb_per_dps();
    Reading {
        sample: ImuSample {
            accel_mps2: [word(0) * a, word(1) * a, word(2) * a],
            gyro_dps: [word(4) * g, word(5) * g, word(6) * g],
        },
        // Register map section 4.18: T = raw / 340 + 36.53.
        temperature_c: word(3) / 340.0 + 36.53,
    }
}

/// An MPU-6050 on an I2C bus.
pub struct Mpu6050<I2C> {
    i2c: I2C,
    addr: u8,
    cfg: Config,
}

impl<I2C: I2c> Mpu6050<I2C> {
    /// Probe the chip at `addr` and configure it (see the module docs for
    /// the sequence). Fails with [`SensorError::WrongChip`] when
    /// `WHO_AM_I` is not 0x68, and with a bus error when nothing answers.
    pub fn new(i2c: I2C, addr: u8, cfg: Config) -> Result<Self, SensorError> {
        if cfg.dlpf_cfg > 6 {
            return Err(SensorError::Invalid(format!(
                "MPU-6050 DLPF_CFG must be 0..=6, got {}",
                cfg.dlpf_cfg
            )));
        }
        let mut dev = Mpu6050 { i2c, addr, cfg };
        let id = dev.read_register(reg::WHO_AM_I, "WHO_AM_I read")?;
        if id != WHO_AM_I_VALUE {
            return Err(SensorError::WrongChip {
                addr,
                chip: "MPU-6050",
                register: reg::WHO_AM_I,
                found: id,
                expected: WHO_AM_I_VALUE,
            });
        }
        dev.write_register(reg::PWR_MGMT_1, PWR_MGMT_1_WAKE_PLL_X, "wake-up")?;
        dev.write_register(
            reg::SMPLRT_DIV,
            dev.cfg.sample_rate_div,
            "sample-rate setup",
        )?;
        dev.write_register(reg::CONFIG, dev.cfg.dlpf_cfg, "low-pass filter setup")?;
        dev.write_register(
            reg::GYRO_CONFIG,
            dev.cfg.gyro_range.fs_sel() << 3,
            "gyro range setup",
        )?;
        dev.write_register(
            reg::ACCEL_CONFIG,
            dev.cfg.accel_range.afs_sel() << 3,
            "accelerometer range setup",
        )?;
        Ok(dev)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Give the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// One burst read, decoded.
    pub fn read(&mut self) -> Result<Reading, SensorError> {
        let mut raw = [0u8; BURST_BYTES];
        let (i2c, addr) = (&mut self.i2c, self.addr);
        with_retries(addr, "burst read", self.cfg.attempts_max, || {
            i2c.write_read(addr, &[reg::ACCEL_XOUT_H], &mut raw)
        })?;
        Ok(decode(&raw, self.cfg.accel_range, self.cfg.gyro_range))
    }

    fn read_register(&mut self, register: u8, op: &'static str) -> Result<u8, SensorError> {
        let mut b = [0u8; 1];
        let (i2c, addr) = (&mut self.i2c, self.addr);
        with_retries(addr, op, self.cfg.attempts_max, || {
            i2c.write_read(addr, &[register], &mut b)
        })?;
        Ok(b[0])
    }

    fn write_register(
        &mut self,
        register: u8,
        value: u8,
        op: &'static str,
    ) -> Result<(), SensorError> {
        let (i2c, addr) = (&mut self.i2c, self.addr);
        with_retries(addr, op, self.cfg.attempts_max, || {
            i2c.write(addr, &[register, value])
        })
    }
}

impl<I2C: I2c> Imu for Mpu6050<I2C> {
    fn read_sample(&mut self) -> Result<ImuSample, SensorError> {
        Ok(self.read()?.sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitivities_match_the_register_map() {
        assert_eq!(AccelRange::G2.lsb_per_g(), 16384.0);
        assert_eq!(AccelRange::G16.lsb_per_g(), 2048.0);
        assert_eq!(GyroRange::Dps2000.fs_sel() << 3, 0x18);
        let r = decode(&[0; 14], AccelRange::G2, GyroRange::Dps250);
        assert_eq!(r.sample.accel_mps2, [0.0; 3]);
        assert!((r.temperature_c - 36.53).abs() < 1e-6);
    }
}
