pub mod admin;
pub mod board;
pub mod grouped;
pub mod health;
