"""Platform adapters (Telegram, Discord, web, SQLite store); none exist yet."""
