//! Device policy: when a device may take federated-learning work.
//!
//! An [`EligibilitySource`] reports the device's [`Conditions`] (external
//! power, battery level, idle, unmetered network); a [`Policy`] decides
//! from them. The driver asks a [`Gate`] (source + policy + re-check
//! interval) before the session asks the aggregator for a task: an
//! ineligible device asks for nothing, declines offers, and checks again
//! later (see `DeviceSession::handle_eligibility`).
//!
//! **Unknown is not yes.** A condition the source cannot tell (idle and
//! unmetered from the Linux power-supply source; a battery whose level
//! cannot be read) fails any requirement on it, so a device never works
//! because it could not look. A source that fails outright makes the
//! device ineligible for that check, with the error as the reason.
//!
//! Sources: [`PowerSupplySysfs`] reads Linux's
//! `/sys/class/power_supply` (root injectable, so tests use a temp tree);
//! [`Reported`] holds conditions a host application pushes in (Android's
//! battery and connectivity broadcasts, through the FFI, say).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default location of the Linux power-supply class.
pub const POWER_SUPPLY_ROOT: &str = "/sys/class/power_supply";
/// Most power-supply entries read (a bound on a directory we do not control).
pub const POWER_SUPPLIES_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "cannot list power supplies in {path}: {source} (pass --power-supply-root, or drop --require-charging and --battery-floor)"
    )]
    PowerSupplyRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds more than {POWER_SUPPLIES_MAX} power supplies")]
    TooManySupplies { path: PathBuf },
    #[error("battery floor {0}% is not a percentage (0..=100)")]
    BatteryFloor(u8),
    #[error("eligibility source: {0}")]
    Source(String),
}

/// What the device knows about itself. `None`: cannot tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conditions {
    /// On external power (plugged in or charging).
    pub external_power: Option<bool>,
    pub battery: Battery,
    /// The user is not using the device.
    pub idle: Option<bool>,
    /// The network is not metered.
    pub unmetered: Option<bool>,
    /// What could not be read, for logs and reasons.
    pub notes: Vec<String>,
}

impl Conditions {
    /// Nothing known.
    pub fn unknown() -> Self {
        Conditions {
            external_power: None,
            battery: Battery::Unknown,
            idle: None,
            unmetered: None,
            notes: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Battery {
    /// No battery: a mains-powered device.
    Absent,
    /// Charge level, 0..=100 (the lowest of several batteries).
    Percent(u8),
    /// There is a battery but its level cannot be read.
    Unknown,
}

/// Reports the device's conditions. Called from the driver's loop, so it
/// must be quick (reading a few small files is).
pub trait EligibilitySource: Send + Sync {
    fn conditions(&self) -> Result<Conditions, PolicyError>;
}

/// What a device requires before it takes work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub require_charging: bool,
    pub require_idle: bool,
    pub require_unmetered: bool,
    /// Least battery charge, percent; applies whether or not the device
    /// is charging. A device without a battery always passes.
    pub battery_floor_percent: Option<u8>,
}

/// A policy's verdict, with every reason it said no.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub eligible: bool,
    pub reasons: Vec<String>,
}

impl Decision {
    fn from_reasons(reasons: Vec<String>) -> Self {
        Decision {
            eligible: reasons.is_empty(),
            reasons,
        }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        match self.battery_floor_percent {
            Some(p) if p > 100 => Err(PolicyError::BatteryFloor(p)),
            _ => Ok(()),
        }
    }

    /// Requires nothing: no source needs to be consulted.
    pub fn is_permissive(&self) -> bool {
        *self == Policy::default()
    }

    pub fn decide(&self, c: &Conditions) -> Decision {
        let mut reasons = Vec::new();
        let mut require = |required: bool, fact: Option<bool>, no: &str, unknown: &str| {
            if required {
                match fact {
                    Some(true) => {}
                    Some(false) => reasons.push(no.to_string()),
                    None => reasons.push(unknown.to_string()),
                }
            }
        };
        require(
            self.require_charging,
            c.external_power,
            "not on external power",
            "cannot tell whether the device is on external power",
        );
        require(
            self.require_idle,
            c.idle,
            "device in use",
            "cannot tell whether the device is idle",
        );
        require(
            self.require_unmetered,
            c.unmetered,
            "network is metered",
            "cannot tell whether the network is metered",
        );
        if let Some(floor) = self.battery_floor_percent {
            match c.battery {
                Battery::Absent => {}
                Battery::Percent(p) if p >= floor => {}
                Battery::Percent(p) => reasons.push(format!("battery at {p}%, floor {floor}%")),
                Battery::Unknown => reasons.push("battery level unknown".into()),
            }
        }
        if !reasons.is_empty() {
            reasons.extend(c.notes.iter().cloned());
        }
        Decision::from_reasons(reasons)
    }
}

/// Conditions pushed in by a host application.
#[derive(Clone, Debug)]
pub struct Reported(Arc<Mutex<Conditions>>);

impl Reported {
    pub fn new(initial: Conditions) -> Self {
        Reported(Arc::new(Mutex::new(initial)))
    }

    pub fn set(&self, c: Conditions) {
        *self.0.lock().expect("conditions lock") = c;
    }
}

impl EligibilitySource for Reported {
    fn conditions(&self) -> Result<Conditions, PolicyError> {
        Ok(self.0.lock().expect("conditions lock").clone())
    }
}

/// Linux's power-supply class: one directory per supply with `type`
/// (`Mains`, `USB`, `Battery`, ...), `online` (1/0, for supplies that feed
/// the device), `status` (`Charging`, `Discharging`, `Full`,
/// `Not charging`) and `capacity` (percent) for batteries.
///
/// - External power: a non-battery supply reads `online` = 1, or a
///   battery reads `Charging` or `Full`; no battery at all means the
///   device runs on mains. With batteries but nothing readable either
///   way, it is unknown.
/// - Battery: the lowest `capacity` of the system's batteries; supplies
///   with `scope` = `Device` (a wireless mouse's battery) are ignored.
/// - Idle and unmetered: unknown (not in this class).
/// - An empty directory is a device with no power-supply drivers: mains.
///   A missing or unlistable directory is an error. A value that cannot
///   be read or parsed is unknown, with a note naming the file; a supply
///   whose `type` cannot be read might be a battery, so the battery level
///   is then unknown and external power only known if another supply
///   shows it.
#[derive(Clone, Debug)]
pub struct PowerSupplySysfs {
    pub root: PathBuf,
}

impl PowerSupplySysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PowerSupplySysfs { root: root.into() }
    }
}

fn read_attr(dir: &Path, name: &str) -> Result<Option<String>, String> {
    let p = dir.join(name);
    match std::fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

impl EligibilitySource for PowerSupplySysfs {
    fn conditions(&self) -> Result<Conditions, PolicyError> {
        let entries =
            std::fs::read_dir(&self.root).map_err(|source| PolicyError::PowerSupplyRoot {
                path: self.root.clone(),
                source,
            })?;
        let mut dirs = Vec::new();
        for e in entries {
            let e = e.map_err(|source| PolicyError::PowerSupplyRoot {
                path: self.root.clone(),
                source,
            })?;
            if dirs.len() == POWER_SUPPLIES_MAX {
                return Err(PolicyError::TooManySupplies {
                    path: self.root.clone(),
                });
            }
            dirs.push(e.path());
        }
        dirs.sort();
        let mut notes = Vec::new();
        fn note(notes: &mut Vec<String>, r: Result<Option<String>, String>) -> Option<String> {
            r.unwrap_or_else(|e| {
                notes.push(e);
                None
            })
        }
        let mut batteries = 0usize;
        let mut levels: Vec<Option<u8>> = Vec::new();
        let mut powered = false;
        let mut unpowered_known = false;
        let mut unreadable = 0usize;
        for d in &dirs {
            let kind = match read_attr(d, "type") {
                Ok(Some(k)) => k,
                Ok(None) => continue, // not a supply entry
                Err(e) => {
                    // Could be a battery: nothing below may assume there is none.
                    notes.push(e);
                    unreadable += 1;
                    continue;
                }
            };
            if kind == "Battery" {
                if note(&mut notes, read_attr(d, "scope")).as_deref() == Some("Device") {
                    continue;
                }
                batteries += 1;
                match note(&mut notes, read_attr(d, "status")).as_deref() {
                    Some("Charging" | "Full") => powered = true,
                    Some("Discharging") => unpowered_known = true,
                    _ => {}
                }
                let cap = note(&mut notes, read_attr(d, "capacity"));
                let level = cap.as_deref().and_then(|c| c.parse::<u8>().ok());
                if cap.is_some() && level.is_none_or(|l| l > 100) {
                    notes.push(format!(
                        "{}: capacity {:?} is not a percentage",
                        d.display(),
                        cap.unwrap_or_default()
                    ));
                }
                levels.push(level.filter(|&l| l <= 100));
            } else {
                match note(&mut notes, read_attr(d, "online")).as_deref() {
                    Some("1") => powered = true,
                    Some("0") => unpowered_known = true,
                    _ => {}
                }
            }
        }
        let (external_power, battery) = if unreadable > 0 {
            (powered.then_some(true), Battery::Unknown)
        } else if batteries == 0 {
            (Some(true), Battery::Absent)
        } else {
            let power = if powered {
                Some(true)
            } else if unpowered_known {
                Some(false)
            } else {
                None
            };
            let battery = if levels.iter().all(Option::is_some) {
                Battery::Percent(levels.iter().flatten().copied().min().unwrap_or(0))
            } else {
                Battery::Unknown
            };
            (power, battery)
        };
        Ok(Conditions {
            external_power,
            battery,
            idle: None,
            unmetered: None,
            notes,
        })
    }
}

/// A source, a policy and how often to look again.
#[derive(Clone)]
pub struct Gate {
    pub source: Arc<dyn EligibilitySource>,
    pub policy: Policy,
    /// How often an ineligible (or eligible) device checks again.
    pub recheck: Duration,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("policy", &self.policy)
            .field("recheck", &self.recheck)
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(source: Arc<dyn EligibilitySource>, policy: Policy, recheck: Duration) -> Self {
        Gate {
            source,
            policy,
            recheck,
        }
    }

    /// Decide now. A source error makes the device ineligible, the error
    /// being the reason.
    pub fn check(&self) -> Decision {
        if self.policy.is_permissive() {
            return Decision::from_reasons(Vec::new());
        }
        match self.source.conditions() {
            Ok(c) => self.policy.decide(&c),
            Err(e) => Decision::from_reasons(vec![e.to_string()]),
        }
    }
}
