#!/usr/bin/env bash
# Install the offline text corpora and the real GPT-2 BPE file that `experiments.data` uses, then pre-tokenize them.
# Idempotent: every step is skipped when its result is already there. Needs network only on first use.
#
#   bash scripts/get_corpora.sh            # everything (apt packages, gpt2.tiktoken, token caches)
#   MST_CACHE=/some/dir bash scripts/get_corpora.sh   # cache somewhere else (default: <repo>/.cache)
#
# What it does:
# 1. Debian packages: python3.11-doc (Python 3.11 docs, rst sources), bible-kjv + bible-kjv-text (King James Bible).
#    Installed with apt-get (as root, or through sudo) when `dpkg -s` says they are missing.
# 2. GPT-2 BPE ranks: `whisper/assets/gpt2.tiktoken` from the openai-whisper sdist on PyPI (MIT licence), fetched with
#    `pip download --no-deps` and extracted alone into $MST_CACHE/tokenizers/ (nothing gets installed); sha256-checked.
# 3. `python -m experiments.data prepare`: tokenizes both corpora into $MST_CACHE/corpora/*.npy (train and held-out splits).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MST_CACHE:-$ROOT/.cache}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PACKAGES=(python3.11-doc bible-kjv bible-kjv-text)
WHISPER=openai-whisper==20250625
TIKTOKEN_SHA256=306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930
TIKTOKEN="$CACHE/tokenizers/gpt2.tiktoken"

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[get_corpora] installing Debian packages: ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "[get_corpora] need root or sudo for: apt-get install ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
  echo "[get_corpora] Debian packages present: ${PACKAGES[*]}" >&2
fi

if [ ! -f "$TIKTOKEN" ] || ! echo "$TIKTOKEN_SHA256  $TIKTOKEN" | sha256sum -c --status; then
  echo "[get_corpora] fetching gpt2.tiktoken from the $WHISPER sdist" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$WHISPER" 2>&1 | grep -v "WARNING: Location" >&2 || true
  sdist="$(ls "$tmp"/openai_whisper-*.tar.gz)"
  tar -xzf "$sdist" -C "$tmp" --wildcards '*/whisper/assets/gpt2.tiktoken'
  mkdir -p "$(dirname "$TIKTOKEN")"
  mv "$tmp"/openai_whisper-*/whisper/assets/gpt2.tiktoken "$TIKTOKEN"
  echo "$TIKTOKEN_SHA256  $TIKTOKEN" | sha256sum -c --status \
    || { echo "[get_corpora] sha256 mismatch for $TIKTOKEN" >&2; rm -f "$TIKTOKEN"; exit 1; }
else
  echo "[get_corpora] tokenizer present: $TIKTOKEN" >&2
fi

MST_CACHE="$CACHE" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m experiments.data prepare
