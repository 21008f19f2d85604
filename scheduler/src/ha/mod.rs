//! High availability on top of the [`crate::store`]: a host's lease kept
//! alive and the host fenced when it cannot be ([`lease_keeper`]), and
//! what to restart where after hosts fail, with capacity held back for it
//! ([`restart`]), and hosts quarantined or evacuated on hardware
//! warnings ([`health`]); a dead host fenced from outside by its fence
//! driver before its VMs restart ([`fence`]).

pub mod election;
pub mod failover;
pub mod fence;
pub mod health;
pub mod lease_keeper;
pub mod restart;
