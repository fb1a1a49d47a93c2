//! Small pieces with no place of their own: the seedable random number generator, running
//! work on the compute pool.
pub mod pool;
pub mod rng;
