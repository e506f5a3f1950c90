//! Dedalus Machines API client.
