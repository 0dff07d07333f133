//! Würstchen v2 (Stage A, B, C) on candle, numerically equal to HuggingFace diffusers.

pub mod config;
pub mod error;
pub mod weights;

pub use error::{Error, Result};
pub mod analysis;
pub mod bench;
pub mod blocks;
pub mod clip;
pub mod compressor;
pub mod dataset;
pub mod default_model;
pub mod depthwise;
pub mod flops;
pub mod forward;
pub mod hub;
pub mod image_io;
pub mod kernels;
pub mod memory;
pub mod noise;
pub mod parity;
pub mod pipeline;
pub mod resize;
pub mod scheduler;
pub mod stage_a;
pub mod stage_b;
pub mod stage_c;
pub mod tokenizer;
pub mod train;
