//! A source written in Lua: `wick.data.lua{ next = function() ... end, state = ..., restore =
//! ... }`. `next()` returns a document's text (or a list of token ids), nil at the end of an
//! epoch (the next call begins the next one). The functions are the recipe's own closures, so
//! they run on the training thread when a batch is asked for: no read-ahead, and the cursor of
//! a batch is exact.
//!
//! Exact resume: before each document wick asks `state()` for a plain-data value that, given
//! to `restore(s)`, makes the next `next()` return that document again. The cursor saves it
//! with the number of the document's tokens already taken. A source without both functions
//! cannot resume; wick refuses rather than silently starting from the beginning.

use super::source::StreamCursor;
use super::Tokenizer;
use mlua::{Function, LuaSerdeExt, Value, WeakLua};
use std::sync::Arc;

/// The recipe's functions.
#[derive(Clone)]
pub struct LuaSource {
    pub name: String,
    pub next: Function,
    pub state: Option<Function>,
    pub restore: Option<Function>,
    pub lua: WeakLua,
}

impl LuaSource {
    pub fn resumable(&self) -> bool {
        self.state.is_some() && self.restore.is_some()
    }

    /// A cursor at the source's current position (its beginning when just made), if it can
    /// say where it is.
    pub fn initial_cursor(&self) -> Option<StreamCursor> {
        let lua = self.lua.try_upgrade()?;
        let v: Value = self.state.as_ref()?.call(()).ok()?;
        let state = lua.from_value::<serde_json::Value>(v).ok()?;
        Some(StreamCursor {
            lua_state: Some(state),
            ..StreamCursor::default()
        })
    }
}

/// A failure inside the source's functions, or a stop that arrived while they ran.
pub enum FeedError {
    Interrupted,
    Failed(String),
}

impl From<mlua::Error> for FeedError {
    fn from(e: mlua::Error) -> Self {
        if crate::host::lua::is_interrupt(&e) {
            FeedError::Interrupted
        } else {
            FeedError::Failed(crate::host::lua::clean_message(&e))
        }
    }
}

/// Tokens from a Lua source, with a cursor a checkpoint can save.
pub struct LuaFeed {
    pub source: LuaSource,
    tokenizer: Arc<Tokenizer>,
    pub cursor: StreamCursor,
    /// Tokens of the document at the cursor; `cursor.token` of them are taken.
    pending: Vec<u32>,
    /// `pending` holds the cursor's document (false after a resume or a reposition).
    loaded: bool,
    docs_this_epoch: u64,
}

impl LuaFeed {
    pub fn new(source: LuaSource, tokenizer: Arc<Tokenizer>, cursor: StreamCursor) -> LuaFeed {
        let loaded = cursor.lua_state.is_none();
        LuaFeed {
            source,
            tokenizer,
            cursor,
            pending: Vec::new(),
            loaded,
            docs_this_epoch: 1,
        }
    }

    /// Append exactly `n` tokens to `out`.
    pub fn take(&mut self, n: usize, out: &mut Vec<u32>) -> Result<(), FeedError> {
        if !self.loaded {
            self.reload()?;
        }
        let mut need = n;
        while need > 0 {
            if self.cursor.token >= self.pending.len() {
                self.next_document()?;
                continue;
            }
            let k = need.min(self.pending.len() - self.cursor.token);
            out.extend_from_slice(&self.pending[self.cursor.token..self.cursor.token + k]);
            self.cursor.token += k;
            need -= k;
        }
        Ok(())
    }

    /// Go back to a saved cursor: restore the source's state and read that document again.
    pub fn reposition(&mut self, cursor: StreamCursor) -> Result<(), FeedError> {
        self.cursor = cursor;
        self.pending.clear();
        self.loaded = false;
        self.reload()
    }

    fn reload(&mut self) -> Result<(), FeedError> {
        self.loaded = true;
        let Some(state) = self.cursor.lua_state.clone() else {
            return Ok(());
        };
        let (Some(restore), Some(lua)) = (&self.source.restore, self.source.lua.try_upgrade())
        else {
            return Err(FeedError::Failed(format!(
                "Lua source {} has no restore(s) function: it cannot go back to a saved position",
                self.source.name
            )));
        };
        restore.call::<()>(lua.to_value(&state)?)?;
        let keep = self.cursor.token;
        let doc = self.source.next.call::<Value>(())?;
        self.pending = self.tokens_of(doc)?.ok_or_else(|| {
            FeedError::Failed(format!(
                "Lua source {}: after restore(s), next() returned nil instead of the saved document",
                self.source.name
            ))
        })?;
        self.cursor.token = keep.min(self.pending.len());
        Ok(())
    }

    fn next_document(&mut self) -> Result<(), FeedError> {
        loop {
            let state = match (&self.source.state, self.source.lua.try_upgrade()) {
                (Some(f), Some(lua)) => {
                    let v: Value = f.call(())?;
                    Some(lua.from_value::<serde_json::Value>(v).map_err(|e| {
                        FeedError::Failed(format!(
                            "Lua source {}: state() must return plain data (numbers, strings, booleans, tables): {e}",
                            self.source.name
                        ))
                    })?)
                }
                _ => None,
            };
            let doc = self.source.next.call::<Value>(())?;
            match self.tokens_of(doc)? {
                Some(tokens) => {
                    self.docs_this_epoch += 1;
                    self.cursor.lua_state = state;
                    self.cursor.line += 1;
                    self.cursor.token = 0;
                    self.pending = tokens;
                    return Ok(());
                }
                None => {
                    if self.docs_this_epoch == 0 {
                        return Err(FeedError::Failed(format!(
                            "Lua source {}: next() returned nil twice in a row (an epoch with no documents)",
                            self.source.name
                        )));
                    }
                    self.docs_this_epoch = 0;
                    self.cursor.epoch += 1;
                    self.cursor.line = 0;
                }
            }
        }
    }

    /// A document's tokens (its end-of-document token included); None for nil.
    fn tokens_of(&self, doc: Value) -> Result<Option<Vec<u32>>, FeedError> {
        let name = &self.source.name;
        let mut tokens = Vec::new();
        match doc {
            Value::Nil => return Ok(None),
            Value::String(s) => {
                let text = s.to_str().map_err(|_| {
                    FeedError::Failed(format!("Lua source {name}: next() returned text that is not UTF-8"))
                })?;
                self.tokenizer
                    .encode_into(&text, &mut tokens)
                    .map_err(FeedError::Failed)?;
            }
            Value::Table(t) => {
                for (i, v) in t.sequence_values::<Value>().enumerate() {
                    match v? {
                        Value::Integer(id) if id >= 0 && id <= u32::MAX as i64 => tokens.push(id as u32),
                        other => {
                            return Err(FeedError::Failed(format!(
                                "Lua source {name}: token {} of the document is {}, not a token id",
                                i + 1,
                                other.type_name()
                            )))
                        }
                    }
                }
            }
            other => {
                return Err(FeedError::Failed(format!(
                    "Lua source {name}: next() must return a string, a list of token ids or nil, not a {}",
                    other.type_name()
                )))
            }
        }
        tokens.push(self.tokenizer.eod());
        Ok(Some(tokens))
    }
}
