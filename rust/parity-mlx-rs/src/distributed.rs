//! Data parallelism on MLX's own collectives: the group `mlx.launch` started (the ring backend on the CPU,
//! reading MLX_RANK and MLX_HOSTFILE), reached through mlx-c's distributed API, which mlx-rs 0.33 does not
//! wrap: `mlx_distributed_init`, `all_sum` and `all_gather` from the mlx-sys bindings, nothing else.

use mlx_rs::{Array, Stream};

use crate::error::{Error, Result};

/// This process's membership of a group of ranks.
pub struct Group {
    raw: mlx_sys::mlx_distributed_group,
}

fn checked(code: i32, what: &str) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Mlx(format!("mlx_distributed_{what} failed (status {code})")))
    }
}

impl Group {
    /// Join the group the launcher's environment describes; an error when there is none.
    pub fn init() -> Result<Group> {
        // SAFETY: `raw` is written by mlx-c before it is read; a null backend name lets MLX pick (ring on the CPU).
        unsafe {
            let mut raw = mlx_sys::mlx_distributed_group_new();
            checked(mlx_sys::mlx_distributed_init(&mut raw, true, std::ptr::null()), "init")?;
            Ok(Group { raw })
        }
    }

    pub fn rank(&self) -> usize {
        // SAFETY: a group mlx-c initialised.
        unsafe { mlx_sys::mlx_distributed_group_rank(self.raw) as usize }
    }

    pub fn size(&self) -> usize {
        // SAFETY: as above.
        unsafe { mlx_sys::mlx_distributed_group_size(self.raw) as usize }
    }

    /// Every rank's `x`, summed: the same values on every rank.
    pub fn all_sum(&self, x: &Array) -> Result<Array> {
        self.collective(x, mlx_sys::mlx_distributed_all_sum, "all_sum")
    }

    /// Every rank's `x`, concatenated along the first axis in rank order.
    pub fn all_gather(&self, x: &Array) -> Result<Array> {
        self.collective(x, mlx_sys::mlx_distributed_all_gather, "all_gather")
    }

    fn collective(
        &self,
        x: &Array,
        op: unsafe extern "C" fn(
            *mut mlx_sys::mlx_array,
            mlx_sys::mlx_array,
            mlx_sys::mlx_distributed_group,
            mlx_sys::mlx_stream,
        ) -> i32,
        what: &str,
    ) -> Result<Array> {
        let stream = Stream::cpu(); // the collectives of the ring backend run on the CPU stream
                                    // SAFETY: `res` is a fresh handle mlx-c fills; the Array takes ownership of it.
        unsafe {
            let mut res = mlx_sys::mlx_array_new();
            let code = op(&mut res, x.as_ptr(), self.raw, stream.as_ptr());
            let out = Array::from_ptr(res);
            checked(code, what)?;
            out.eval().map_err(|e| Error::Mlx(format!("{what}: {e}")))?;
            Ok(out)
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: freed once, here.
        unsafe {
            mlx_sys::mlx_distributed_group_free(self.raw);
        }
    }
}
