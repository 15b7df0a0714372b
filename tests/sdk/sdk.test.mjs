// The official openai npm SDK driving a running aigw (node's built-in test
// runner: `node --test sdk.test.mjs`). tests/integration/test_sdk.py starts
// the gateway in front of tests/mock_provider.py and sets:
//
//   AIGW_BASE_URL     e.g. http://127.0.0.1:8080/v1   (required)
//   AIGW_API_KEY      a key the gateway accepts        (required)
//   AIGW_MODEL        chat model        (mock-gpt)
//   AIGW_EMBED_MODEL  embeddings model  (mock-embed)
//
// Expected texts follow the mock's deterministic rules (docs/MOCK_PROVIDER.md):
// the reply to "hello there world" is "mock reply to: hello there" (5 tokens).

import { test } from "node:test";
import assert from "node:assert/strict";
import OpenAI from "openai";

const baseURL = process.env.AIGW_BASE_URL;
const apiKey = process.env.AIGW_API_KEY;
const model = process.env.AIGW_MODEL ?? "mock-gpt";
const embedModel = process.env.AIGW_EMBED_MODEL ?? "mock-embed";
if (!baseURL || !apiKey) {
  throw new Error("set AIGW_BASE_URL and AIGW_API_KEY (see tests/integration/test_sdk.py)");
}

// No retries: a retried request would hide a gateway error.
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 10_000 });
const messages = [{ role: "user", content: "hello there world" }];
const reply = "mock reply to: hello there";

test("models.list returns the configured models", async () => {
  const ids = [];
  for await (const m of client.models.list()) {
    assert.equal(m.object, "model");
    ids.push(m.id);
  }
  assert.ok(ids.includes(model), `models: ${ids}`);
  assert.ok(ids.includes(embedModel), `models: ${ids}`);
});

test("chat.completions.create", async () => {
  const completion = await client.chat.completions.create({ model, messages });
  assert.equal(completion.object, "chat.completion");
  assert.equal(completion.choices[0].message.role, "assistant");
  assert.equal(completion.choices[0].message.content, reply);
  assert.equal(completion.choices[0].finish_reason, "stop");
  assert.deepEqual(
    [completion.usage.prompt_tokens, completion.usage.completion_tokens,
      completion.usage.total_tokens],
    [3, 5, 8]);
});

test("chat.completions.create with stream and include_usage", async () => {
  const stream = await client.chat.completions.create({
    model, messages, stream: true, stream_options: { include_usage: true },
  });
  let text = "";
  let chunks = 0;
  let usage = null;
  let finish = null;
  for await (const chunk of stream) {
    chunks += 1;
    assert.equal(chunk.object, "chat.completion.chunk");
    for (const choice of chunk.choices) {
      text += choice.delta?.content ?? "";
      finish = choice.finish_reason ?? finish;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  assert.equal(text, reply);
  assert.equal(finish, "stop");
  assert.ok(chunks >= 7, `only ${chunks} chunks`);  // role, 5 tokens, finish, usage
  assert.ok(usage, "no usage chunk although include_usage was asked");
  assert.deepEqual([usage.prompt_tokens, usage.completion_tokens, usage.total_tokens],
    [3, 5, 8]);
});

test("chat.completions.create with stream, no usage unless asked", async () => {
  const stream = await client.chat.completions.create({ model, messages, stream: true });
  let text = "";
  for await (const chunk of stream) {
    assert.ok(!chunk.usage, `usage chunk the client did not ask for: ${JSON.stringify(chunk)}`);
    text += chunk.choices[0]?.delta?.content ?? "";
  }
  assert.equal(text, reply);
});

test("completions.create (legacy)", async () => {
  const completion = await client.completions.create({
    model, prompt: "say this is a test", max_tokens: 3,
  });
  assert.equal(completion.object, "text_completion");
  assert.equal(completion.choices[0].text, "mock reply to:");
  assert.equal(completion.choices[0].finish_reason, "length");
  assert.equal(completion.usage.completion_tokens, 3);
});

test("embeddings.create (the SDK asks for base64 and decodes it)", async () => {
  const result = await client.embeddings.create({
    model: embedModel, input: ["first text", "second text"],
  });
  assert.equal(result.object, "list");
  assert.equal(result.data.length, 2);
  for (const item of result.data) {
    assert.equal(item.embedding.length, 8);
    const norm = Math.sqrt(item.embedding.reduce((s, x) => s + x * x, 0));
    assert.ok(Math.abs(norm - 1) < 1e-5, `norm ${norm}`);
  }
  assert.notDeepEqual(result.data[0].embedding, result.data[1].embedding);
  assert.equal(result.usage.prompt_tokens, 4);
});

test("a bad key is an AuthenticationError", async () => {
  const bad = new OpenAI({ baseURL, apiKey: "sk-not-a-key", maxRetries: 0 });
  await assert.rejects(bad.chat.completions.create({ model, messages }), (err) => {
    assert.ok(err instanceof OpenAI.AuthenticationError, `${err.constructor.name}: ${err}`);
    assert.equal(err.status, 401);
    assert.equal(err.code, "invalid_api_key");
    return true;
  });
});

test("a bad body is a BadRequestError", async () => {
  await assert.rejects(
    client.chat.completions.create({ model, messages: "not an array" }),
    (err) => {
      assert.ok(err instanceof OpenAI.BadRequestError, `${err.constructor.name}: ${err}`);
      assert.equal(err.status, 400);
      assert.equal(typeof err.error?.message, "string");
      return true;
    });
});

test("an unknown model is a NotFoundError", async () => {
  await assert.rejects(
    client.chat.completions.create({ model: "no-such-model", messages }),
    (err) => {
      assert.ok(err instanceof OpenAI.NotFoundError, `${err.constructor.name}: ${err}`);
      assert.equal(err.status, 404);
      assert.equal(err.code, "model_not_found");
      return true;
    });
});
