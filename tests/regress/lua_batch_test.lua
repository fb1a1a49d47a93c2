-- Regression cases built from fixed Lua batches: no data files, same numbers every run.

local function tiny()
  local model = wick.model{ dim = 16, n_layers = 1, n_heads = 2, seq_len = 8 }
  return model, wick.session{ model = model, optim = wick.optim.adamw{ lr = 1e-2, weight_decay = 0 } }
end

test("a fixed Lua batch is learned", function()
  local _, session = tiny()
  local b = wick.data.batch{ { 1, 2, 3, 4, 5, 6, 7, 8, 9 }, { 9, 8, 7, 6, 5, 4, 3, 2, 1 } }
  local first = session:step(b)
  local last
  for _ = 1, 60 do last = session:step(b) end
  expect(last):below(first / 3)
end)

test("the same batch gives the same loss in a fresh session", function()
  local _, a = tiny()
  local _, b = tiny()
  local batch = wick.data.batch{ { 3, 1, 4, 1, 5, 9, 2, 6, 5 } }
  expect(a:step(batch)):to_be(b:step(batch))
end)
