//! The learning stage (paper Algorithm 1). Issue 4 builds the loop; the loss terms live in
//! [`losses`] and are already checked against the reference code by `mifo model verify`.

pub mod losses;
