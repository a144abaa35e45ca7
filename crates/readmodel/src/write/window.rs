//! Document-window refills: the members past a status's window, and the
//! guarded script that extends it.

use callboard_domain::{StatusKey, TenantId};
use redis::AsyncCommands;

use super::script::{fenced, script, FILL};
use super::Writer;
use crate::ReadModelError;

impl Writer {
    /// A status's document window and the members that would extend it
    /// (ranks `d` up to the window's size).
    pub async fn window_gap(&self, tenant: TenantId, status: StatusKey) -> Result<(u64, Vec<Vec<u8>>), ReadModelError> {
        let mut c = self.conn().await?;
        let d: Option<u64> = c.hget(self.keys.windows(tenant), status.get()).await?;
        let d = d.unwrap_or(0);
        if d >= self.window.size {
            return Ok((d, Vec::new()));
        }
        let members: Vec<Vec<u8>> =
            c.zrevrange(self.keys.zset(tenant, status), d as isize, self.window.size as isize - 1).await?;
        Ok((d, members))
    }

    /// Extends a status's window from `d` with `docs` (member, stored) in
    /// rank order. Returns the new window, or `None` if the window moved
    /// since [`Writer::window_gap`] read it.
    pub async fn fill_window(
        &self,
        tenant: TenantId,
        status: StatusKey,
        d: u64,
        docs: &[(Vec<u8>, String)],
    ) -> Result<Option<u64>, ReadModelError> {
        static CELL: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let check = self.check(&self.keys.tenant_tag(tenant));
        let mut invocation = script(&CELL, FILL).prepare_invoke();
        invocation
            .key(&check.key)
            .key(self.keys.zset(tenant, status))
            .key(self.keys.docs(tenant))
            .key(self.keys.windows(tenant))
            .key(self.keys.version(tenant))
            .arg(check.mode)
            .arg(&check.value)
            .arg(self.window.size)
            .arg(status.get())
            .arg(d);
        for (member, stored) in docs {
            invocation.arg(member.as_slice()).arg(stored);
        }
        let mut c = self.conn().await?;
        let now: i64 = invocation.invoke_async(&mut c).await.map_err(fenced)?;
        Ok(u64::try_from(now).ok())
    }
}
