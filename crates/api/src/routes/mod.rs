pub mod grouped;
pub mod health;
