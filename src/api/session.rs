//! `wick.optim.adamw{...}`, `wick.session{...}` and the session object: step, eval, the step
//! loop, the learning rate.

use super::data::{BatchHandle, LoaderHandle};
use super::model::ModelHandle;
use super::opts::{describe, table_arg, whole_number, Opts};
use super::{check_stop, context, lock};
use crate::train::{AdamW, AdamWConfig, Session};
use mlua::{Lua, MetaMethod, UserData, UserDataMethods, Value};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct OptimHandle(pub AdamWConfig);
impl UserData for OptimHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(format!("wick.optim.adamw{:?}", this.0))
        });
    }
}

#[derive(Clone)]
pub struct SessionHandle {
    pub session: Arc<Mutex<Session>>,
    pub model: ModelHandle,
}

const ADAMW_KEYS: &[&str] = &[
    "lr",
    "betas",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "clip",
];

pub fn adamw(_: &Lua, options: Option<Value>) -> mlua::Result<OptimHandle> {
    let mut c = AdamWConfig::default();
    let Some(options) = options.filter(|v| !v.is_nil()) else {
        return Ok(OptimHandle(c));
    };
    let o = Opts::new(
        "wick.optim.adamw",
        table_arg("wick.optim.adamw", options)?,
        ADAMW_KEYS,
        false,
    )?;
    c.lr = o.f64("lr")?.unwrap_or(c.lr);
    if let Value::Table(b) = o.value("betas")? {
        c.beta1 = b.get::<f64>(1).map_err(|_| {
            mlua::Error::runtime("option 'betas' of wick.optim.adamw must be {beta1, beta2}")
        })?;
        c.beta2 = b.get::<f64>(2).map_err(|_| {
            mlua::Error::runtime("option 'betas' of wick.optim.adamw must be {beta1, beta2}")
        })?;
    } else if !o.value("betas")?.is_nil() {
        return Err(mlua::Error::runtime(
            "option 'betas' of wick.optim.adamw must be {beta1, beta2}",
        ));
    }
    c.beta1 = o.f64("beta1")?.unwrap_or(c.beta1);
    c.beta2 = o.f64("beta2")?.unwrap_or(c.beta2);
    c.eps = o.f64("eps")?.unwrap_or(c.eps);
    c.weight_decay = o.f64("weight_decay")?.unwrap_or(c.weight_decay);
    if let Some(clip) = o.f64("clip")? {
        c.clip = if clip > 0.0 { Some(clip) } else { None };
    }
    for (name, v) in [("beta1", c.beta1), ("beta2", c.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(mlua::Error::runtime(format!(
                "wick.optim.adamw: {name} must be in [0, 1), got {v}"
            )));
        }
    }
    if !(c.lr.is_finite() && c.lr >= 0.0) {
        return Err(mlua::Error::runtime(format!(
            "wick.optim.adamw: lr must be a non-negative number, got {}",
            c.lr
        )));
    }
    Ok(OptimHandle(c))
}

const SESSION_KEYS: &[&str] = &["model", "optim", "lr", "resume"];

pub fn create(lua: &Lua, options: Value) -> mlua::Result<SessionHandle> {
    check_stop()?;
    let o = Opts::new(
        "wick.session",
        table_arg("wick.session", options)?,
        SESSION_KEYS,
        false,
    )?;
    let model = match o.value("model")? {
        Value::UserData(ud) => ud.borrow::<ModelHandle>().map(|m| m.clone()).map_err(|_| {
            mlua::Error::runtime(
                "option 'model' of wick.session must be a model from wick.model{...}",
            )
        })?,
        _ => {
            return Err(mlua::Error::runtime(
                "wick.session needs a model: wick.session{ model = wick.model{...} }",
            ))
        }
    };
    let optim = match o.value("optim")? {
        Value::Nil => AdamWConfig::default(),
        Value::UserData(ud) => ud
            .borrow::<OptimHandle>()
            .map(|h| h.0.clone())
            .map_err(|_| {
                mlua::Error::runtime("option 'optim' of wick.session must be wick.optim.adamw{...}")
            })?,
        _ => {
            return Err(mlua::Error::runtime(
                "option 'optim' of wick.session must be wick.optim.adamw{...}",
            ))
        }
    };
    let mut session = Session::new(model.model.clone(), AdamW::new(optim));
    if let Some(lr) = o.f64("lr")? {
        session.lr = lr;
    }
    let ctx = context(lua)?;
    let mut c = lock(&ctx);
    let explicit = match o.string("resume")? {
        Some(path) => Some(Arc::new(
            crate::ckpt::load(std::path::Path::new(&path))
                .map_err(|e| mlua::Error::runtime(format!("wick.session: {e}")))?,
        )),
        None => None,
    };
    if let Some(ckpt) = explicit.or_else(|| c.resume.clone().filter(|_| c.session.is_none())) {
        crate::run::resume::restore(&mut session, &ckpt)?;
    }
    let session = Arc::new(Mutex::new(session));
    c.session = Some(session.clone());
    Ok(SessionHandle { session, model })
}

impl SessionHandle {
    fn lock(&self) -> mlua::Result<std::sync::MutexGuard<'_, Session>> {
        Ok(crate::run::step::lock_session(&self.session)?)
    }
}

/// `session:step(batch)`: the run's step path; the batch's cursor is committed once it trained.
fn step(lua: &Lua, this: &SessionHandle, batch: Value) -> mlua::Result<f64> {
    check_stop()?;
    let not_a_batch = |v: &Value| {
        mlua::Error::runtime(format!(
            "session:step expects a batch (from loader:next() or wick.data.batch{{...}}), got {}",
            describe(v)
        ))
    };
    let Value::UserData(ud) = &batch else {
        return Err(not_a_batch(&batch));
    };
    let batch = ud
        .borrow::<BatchHandle>()
        .map_err(|_| not_a_batch(&batch))?;
    let ctx = context(lua)?;
    Ok(crate::run::step::train(
        &ctx,
        &this.session,
        &batch.windows,
        || batch.commit(),
        || crate::run::guard::read_state(lua),
    )?)
}

fn eval(this: &SessionHandle, loader: Value, n: Value) -> mlua::Result<f64> {
    check_stop()?;
    let not_a_loader = || {
        mlua::Error::runtime(format!(
            "session:eval expects a loader: session:eval(loader, n_batches), got {}",
            describe(&loader)
        ))
    };
    let Value::UserData(ud) = &loader else {
        return Err(not_a_loader());
    };
    let loader = ud.borrow::<LoaderHandle>().map_err(|_| not_a_loader())?;
    let n = match n {
        Value::Nil => 8,
        v => match whole_number(&v, "session:eval's number of batches")? {
            0 => {
                return Err(mlua::Error::runtime(
                    "session:eval's number of batches must be at least 1, got 0",
                ))
            }
            n => n as usize,
        },
    };
    Ok(crate::run::step::eval(&this.session, &loader.0, n)?)
}

impl UserData for SessionHandle {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("global_step", |_, this| Ok(this.lock()?.step));
        fields.add_field_method_get("lr", |_, this| Ok(this.lock()?.lr));
        fields.add_field_method_set("lr", |_, this, v: Value| {
            let lr = match v {
                Value::Integer(i) => i as f64,
                Value::Number(n) => n,
                _ => f64::NAN,
            };
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(mlua::Error::runtime(format!(
                    "session.lr must be a non-negative number, got {}",
                    describe(&v)
                )));
            }
            this.lock()?.lr = lr;
            Ok(())
        });
        // The counters are the host's: a recipe that sets them gets told so, at its line.
        for name in [
            "global_step",
            "last_loss",
            "tokens_seen",
            "grad_norm",
            "model",
        ] {
            fields.add_field_method_set(name, move |_, _, _: Value| -> mlua::Result<()> {
                Err(mlua::Error::runtime(format!(
                    "session.{name} is read-only (the host keeps it); only session.lr can be set"
                )))
            });
        }
        fields.add_field_method_get("last_loss", |_, this| Ok(this.lock()?.last_loss));
        fields.add_field_method_get("tokens_seen", |_, this| Ok(this.lock()?.tokens_seen));
        fields.add_field_method_get("grad_norm", |_, this| Ok(this.lock()?.last_grad_norm));
        fields.add_field_method_get("model", |_, this| Ok(this.model.clone()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("step", |lua, this, batch: Value| step(lua, this, batch));
        methods.add_method("eval", |_, this, (loader, n): (Value, Value)| {
            eval(this, loader, n)
        });
        // `for step in session:steps(N) do ... end`: the steps still to run up to N, so a
        // resumed run continues where the checkpoint stopped with no arithmetic in the recipe.
        methods.add_method("steps", |lua, this, total: Value| {
            check_stop()?;
            let total = whole_number(&total, "session:steps(N)'s N")?;
            let first = this.lock()?.step;
            crate::host::progress::start(first, total);
            let mut next = first;
            lua.create_function_mut(move |_, ()| {
                check_stop()?;
                next += 1;
                Ok(if next <= total { Some(next) } else { None })
            })
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            let s = this.lock()?;
            Ok(format!(
                "wick.session(step={}, lr={:.3e}, last_loss={}, tokens_seen={})",
                s.step,
                s.lr,
                s.last_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_else(|| "-".into()),
                s.tokens_seen
            ))
        });
    }
}
