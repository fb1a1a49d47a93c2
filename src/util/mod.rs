//! Small pieces with no place of their own: the seedable random number generator.
pub mod rng;
