#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (SQLite in ./voiceprint-home):
# stream the enrollments of a small real data set, then identify and verify a voice.
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
$vp calibrate   # thresholds measured on leave-one-out trials of these enrollments
$vp identify "$DATA/vctk-4/$probe" --top 3
$vp verify "$(dirname "$probe")" "$DATA/vctk-4/$probe"
