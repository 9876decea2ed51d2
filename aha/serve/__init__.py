"""Using a trained model: engine.py the continuous-batching decoder; server.py the OpenAI-compatible
API (`aha serve`); chat.py `aha chat`; reasoning.py splits the thinking from the answer
(`reasoning_content`); live_tools.py tool calls run during a chat; cli.py the two commands."""
