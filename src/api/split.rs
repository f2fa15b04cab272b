//! A batch split into the items the API layer refused (malformed, not
//! permitted) and the ones it hands to the vault, so that the vault's
//! results can be put back in request order.

use tonic::Code;

use super::status::{item_error, vault_item_error};
use crate::{proto::v1 as pb, vault::ItemError};

/// Items of one request, in order: refused here, or passed on.
pub(super) struct Split<P> {
    /// `Some(error)` for an item refused here, `None` for one passed on.
    early: Vec<Option<pb::ItemError>>,
    passed: Vec<P>,
}

impl<P> Split<P> {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            early: Vec::with_capacity(n),
            passed: Vec::new(),
        }
    }

    /// Records the next item of the request.
    pub(super) fn push(&mut self, item: Result<P, pb::ItemError>) {
        match item {
            Ok(p) => {
                self.passed.push(p);
                self.early.push(None);
            }
            Err(e) => self.early.push(Some(e)),
        }
    }

    /// How many items the request had, and how many were refused here.
    pub(super) fn counts(&self) -> (usize, usize) {
        (
            self.early.len(),
            self.early.iter().filter(|e| e.is_some()).count(),
        )
    }

    /// The items passed on, to hand to the vault.
    pub(super) fn take_passed(&mut self) -> Vec<P> {
        std::mem::take(&mut self.passed)
    }

    /// One result per request item, in order: the early refusals, and the
    /// vault's `later` results (one per passed item) through `ok`.
    pub(super) fn merge<T, R>(
        self,
        later: Vec<Result<T, ItemError>>,
        ok: impl Fn(T) -> R,
        err: impl Fn(pb::ItemError) -> R,
    ) -> Vec<R> {
        interleave(self.early.into_iter(), later.into_iter(), ok, err)
    }

    /// [`Split::merge`] of results the caller keeps: the answer a call
    /// will give, encoded before it is given.
    pub(super) fn merge_ref<'a, T, R>(
        &self,
        later: &'a [Result<T, ItemError>],
        ok: impl Fn(&'a T) -> R,
        err: impl Fn(pb::ItemError) -> R,
    ) -> Vec<R> {
        interleave(
            self.early.iter().cloned(),
            later.iter().map(Result::as_ref),
            ok,
            err,
        )
    }
}

fn interleave<T, E: std::borrow::Borrow<ItemError>, R>(
    early: impl Iterator<Item = Option<pb::ItemError>>,
    mut later: impl Iterator<Item = Result<T, E>>,
    ok: impl Fn(T) -> R,
    err: impl Fn(pb::ItemError) -> R,
) -> Vec<R> {
    early
        .map(|early| match early {
            Some(e) => err(e),
            None => match later.next() {
                Some(Ok(t)) => ok(t),
                Some(Err(e)) => err(vault_item_error(e.borrow())),
                // The vault answers once per item it was given.
                None => err(item_error(Code::Internal, "internal error")),
            },
        })
        .collect()
}
