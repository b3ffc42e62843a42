#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (SQLite in ./voiceprint-home):
# stream the enrollments of a small real data set, then identify and verify a voice,
# from the command line and over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA="${VOICEPRINT_DEV_DATA:-../shared/data}"
if [ ! -f "$DATA/vctk-4/manifest.csv" ]; then
  echo "quickstart: no speech data at $DATA (set VOICEPRINT_DEV_DATA to the folder holding vctk-4/)" >&2
  exit 1
fi
export VOICEPRINT_HOME="${VOICEPRINT_HOME:-$PWD/voiceprint-home}"
vp=.venv/bin/voiceprint

$vp init
# Enroll every speaker of the set from its manifest (columns path,speaker,... ; extra columns are ignored),
# except the last utterance of each speaker, which we keep back as a probe.
manifest="$DATA/vctk-4/manifest.csv"
probe=$(awk -F, 'NR>1 {last[$2]=$1} END {for (s in last) {print last[s]; exit}}' "$manifest")
awk -F, -v dir="$DATA/vctk-4" -v probe="$probe" \
    'NR == 1 {print "speaker,path"; next} $1 != probe {print $2 "," dir "/" $1}' "$manifest" | $vp stream -
$vp speakers
$vp status      # 4 speakers: decisions use the encoder's reference thresholds until 30 are enrolled and calibrated
$vp identify "$DATA/vctk-4/$probe" --top 3
$vp verify "$(dirname "$probe")" "$DATA/vctk-4/$probe"

# The same question over HTTP: a query key, the service on a free port, one identify call.
key=$($vp keys create --role query --note quickstart)
log=$(mktemp)
$vp serve --port 0 2> "$log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
url=""
for _ in $(seq 240); do
  url=$(grep -o 'http://127.0.0.1:[0-9]*' "$log" | head -1 || true)
  if [ -n "$url" ] && curl -sf "$url/healthz" > /dev/null; then break; fi
  sleep 0.5
done
curl -sf -H "Authorization: Bearer $key" -H "Content-Type: audio/flac" \
     --data-binary @"$DATA/vctk-4/$probe" "$url/v1/identify?top=1"
echo
kill "$server"
wait "$server"
