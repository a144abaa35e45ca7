pub mod admin;
pub mod grouped;
pub mod health;
