//! Warms: a tenant's snapshot loaded over what the stream maintains.

use std::collections::HashMap;

use callboard_domain::{DocKey, StatusKey, TenantId};

use super::{GlobalOp, TenantOp, Writer};
use crate::codec::{CallEntry, Place};
use crate::ReadModelError;

impl Writer {
    /// Loads snapshot entries of one tenant (during a warm): calls put in
    /// place as if inserted. Each call's locator keeps the places it already
    /// names: another warm tenant may still hold the call at the stream's
    /// position (it moved after), and the event that moved it must find it
    /// there.
    pub async fn put_snapshot(
        &self,
        tenant: TenantId,
        entries: &[CallEntry],
    ) -> Result<Vec<(TenantId, StatusKey)>, ReadModelError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // A scan can return a document twice (it moved within the index
        // being scanned): the last one read wins, as an event would.
        let mut last: HashMap<&DocKey, &CallEntry> = HashMap::with_capacity(entries.len());
        for e in entries {
            last.insert(&e.doc, e);
        }
        let entries: Vec<&CallEntry> =
            entries.iter().filter(|e| last.get(&e.doc).is_some_and(|l| std::ptr::eq(*l, *e))).collect();
        let docs: Vec<DocKey> = entries.iter().map(|e| e.doc.clone()).collect();
        let view = self.load_locators(&docs, &[], &[], &[]).await?;
        let mut ops = Vec::with_capacity(entries.len());
        let (mut locators, mut narrowed) = (Vec::with_capacity(entries.len()), Vec::new());
        for e in entries {
            let mut places = view.call_loc.get(&e.doc).cloned().unwrap_or_default();
            let stale: Vec<Place> = places.iter().filter(|p| p.tenant == tenant && **p != e.place).copied().collect();
            for old in &stale {
                ops.push(TenantOp::Remove { doc: e.doc.clone(), place: *old });
            }
            ops.push(TenantOp::Put((*e).clone()));
            places.insert(e.place);
            locators.push(GlobalOp::call_loc(e.doc.clone(), &places));
            if !stale.is_empty() {
                places.retain(|p| !stale.contains(p));
                narrowed.push(GlobalOp::call_loc(e.doc.clone(), &places));
            }
        }
        // Locators first: a crash after them leaves a place named but empty,
        // which is harmless; the other order could hide a placed call. The
        // places this tenant's script emptied are dropped after it ran.
        self.run_global(&locators).await?;
        let mut batch = self.tenant_batch(tenant);
        self.tenant_ops(&mut batch, tenant, &ops);
        let short = batch.run(&mut self.conn().await?, self.window).await.map_err(|e| super::rejected(tenant, e))?;
        self.run_global(&narrowed).await?;
        Ok(short.into_iter().map(|s| (tenant, s)).collect())
    }
}
