//! The typed error of a configuration that cannot work.

use std::fmt;

/// Why a backpressure configuration was refused (by
/// [`BackpressureLayer::adaptive`](super::BackpressureLayer::adaptive)).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The floor of an adaptive limit is 0: the limit could fall to 0 and never learn again.
    ZeroFloor,
    /// The floor is above the ceiling, or the ceiling above 2³¹ − 1.
    BadBounds {
        /// The floor given.
        floor: usize,
        /// The ceiling given.
        ceiling: usize,
    },
    /// The initial limit is outside the floor and the ceiling.
    InitialOutOfBounds {
        /// The initial limit given.
        initial: usize,
        /// The floor.
        floor: usize,
        /// The ceiling.
        ceiling: usize,
    },
    /// The window is zero.
    ZeroWindow,
    /// The minimum number of samples in a window is zero.
    ZeroMinSamples,
    /// A factor is out of its range, or not a finite number.
    BadFactor {
        /// Which setting.
        name: &'static str,
        /// The value given.
        value: f64,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::ZeroFloor => {
                f.write_str("the floor of an adaptive limit must be at least 1")
            }
            ConfigError::BadBounds { floor, ceiling } => write!(
                f,
                "adaptive limit bounds out of order or too large: floor {floor}, ceiling {ceiling}"
            ),
            ConfigError::InitialOutOfBounds {
                initial,
                floor,
                ceiling,
            } => write!(
                f,
                "initial limit {initial} outside the bounds {floor}..={ceiling}"
            ),
            ConfigError::ZeroWindow => {
                f.write_str("the window of an adaptive limit must not be zero")
            }
            ConfigError::ZeroMinSamples => {
                f.write_str("the minimum number of samples in a window must be at least 1")
            }
            ConfigError::BadFactor { name, value } => {
                write!(f, "`{name}` out of range: {value}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}
