"""The benchmark's verdicts (targets) and its printed tables."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from bench import peer as peer_lib

# The targets on this CPU (ratios against the peer at the same precision/batch).
TRAIN_SPEEDUP = 1.1
FORWARD_SPEEDUP = 1.2
FWD_BWD_MFU = 0.75
DATA_HEADROOM = 20.0
TRAIN_MEMORY_FACTOR = 2.0   # peak <= 2 x (parameters + optimizer state)

_PRECISION_LABEL = {'float32': 'float32', 'bfloat16': 'mixed bf16'}


def _fmt(value, spec='.3f', suffix='') -> str:
  if value is None:
    return '-'
  if isinstance(value, str):
    return value
  return f'{value:{spec}}{suffix}'


def _gb(value) -> str:
  return '-' if value is None else f'{value / 1e9:.2f}'


def table(headers: Sequence[str], rows: List[Sequence[str]]) -> str:
  """A plain fixed-width text table."""
  widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
            for i, h in enumerate(headers)]
  line = lambda cells: '  '.join(str(c).rjust(w) if i else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return '\n'.join([line(headers), line(['-' * w for w in widths])] + [line(r) for r in rows])


def _peer_time(row) -> Optional[float]:
  peer = row.get('peer')
  return peer.get('median_s') if isinstance(peer, dict) else None


def targets(results: Dict) -> List[Dict]:
  """Each target the run can judge: name, measured value, threshold, met (bool)."""
  out = []

  def add(name, value, threshold, higher_is_better=True, note=''):
    if value is None:
      out.append({'target': name, 'value': None, 'threshold': threshold, 'met': None,
                  'note': note or 'not measured'})
      return
    met = value >= threshold if higher_is_better else value <= threshold
    out.append({'target': name, 'value': value, 'threshold': threshold, 'met': bool(met),
                'note': note})

  for row in results.get('train', []):
    label = _PRECISION_LABEL[row['precision']]
    add(f'train step {label} b{row["batch"]}: speedup vs transformers', row.get('speedup'),
        TRAIN_SPEEDUP, note='' if row.get('speedup') else peer_lib.NOT_INSTALLED)
  for row in results.get('forward', []):
    label = _PRECISION_LABEL[row['precision']]
    add(f'forward {label} b{row["batch"]}: speedup vs transformers', row.get('speedup'),
        FORWARD_SPEEDUP, note='' if row.get('speedup') else peer_lib.NOT_INSTALLED)
  for row in results.get('fwd_bwd', []):
    label = _PRECISION_LABEL[row['precision']]
    add(f'forward+backward {label} b{row["batch"]}: fraction of matmul peak',
        row['ours'].get('mfu'), FWD_BWD_MFU)
  data = results.get('data')
  if data:
    for need in data.get('needs', []):
      add(f'data pipeline b{need["batch"]}: batches/s over the fastest train step\'s need',
          need.get('headroom'), DATA_HEADROOM)
  for point in results.get('memory', []):
    if (point.get('kind') == 'train' and point.get('batch') == 1 and 'error' not in point
        and point.get('seq_len') == point.get('max_seq_len') == results['config']['seq_len']):
      ratio = point['xla']['peak'] / point['state_bytes']
      add(f'train step memory {_PRECISION_LABEL[point["precision"]]} b1: XLA peak / '
          '(parameters + optimizer state)', ratio, TRAIN_MEMORY_FACTOR,
          higher_is_better=False)
  return out


def render(results: Dict) -> str:
  """All tables, as printed at the end of a run."""
  meta, config = results['meta'], results['config']
  parts = [
      f'Perceiver IO masked LM, preset {config["preset"]} ({config["params"] / 1e6:.1f}M '
      f'parameters), {config["seq_len"]} bytes per sequence; suite {meta["suite"]}',
      f'{meta["cpu_model"]}, {meta["cores"]} cores; jax {meta["versions"]["jax"]}, '
      f'torch {meta["versions"]["torch"]}, transformers {meta["versions"]["transformers"]}; '
      f'load average at start/end {meta["loadavg_start"]} / {meta.get("loadavg_end")}',
  ]
  if meta.get('other_processes'):
    parts.append(f'WARNING: other Python processes were running: {meta["other_processes"]}')
  peak = results.get('peak', {})
  if peak:
    parts.append('Matmul peak measured in this run (jnp.dot, float32 accumulation): ' +
                 ', '.join(f'{_PRECISION_LABEL[p]} {v["flops_per_s"] / 1e9:.0f} GFLOP/s'
                           for p, v in peak.items()))
  for section, title in (('forward', 'Forward (inference)'),
                         ('train', 'Train step (forward, backward, optimizer update)')):
    rows = results.get(section, [])
    if not rows:
      continue
    headers = [title, 'batch', 'ours s', 'peer s', 'speedup', 'ours bytes/s',
               'ours GFLOP/s', 'MFU', 'XLA/analytic FLOPs', 'spread ours/peer']
    if section == 'train':
      headers[2] = f'ours s ({rows[0]["ours"]["optimizer"]})'
      peer_opt = next((r['peer'].get('optimizer') for r in rows
                       if isinstance(r.get('peer'), dict)), None)
      headers[3] = f'peer s ({peer_opt})' if peer_opt else 'peer s'
    body = []
    for row in rows:
      ours, peer = row['ours'], row.get('peer')
      body.append([
          _PRECISION_LABEL[row['precision']], str(row['batch']), _fmt(ours['median_s']),
          _fmt(_peer_time(row)) if isinstance(peer, dict) else str(peer),
          _fmt(row.get('speedup'), '.2f', 'x'), _fmt(ours['bytes_per_s'], ',.0f'),
          _fmt(ours['flops_per_s'] / 1e9, '.0f'), _fmt(ours.get('mfu'), '.0%'),
          _fmt(ours.get('xla_over_analytic'), '.3f'),
          f'{ours["spread"]:.0%}/' + (f'{peer["spread"]:.0%}' if isinstance(peer, dict)
                                      else '-')])
    parts += ['', table(headers, body)]
  rows = results.get('fwd_bwd', [])
  if rows:
    body = [[_PRECISION_LABEL[r['precision']], str(r['batch']), _fmt(r['ours']['median_s']),
             _fmt(r['ours']['flops_per_s'] / 1e9, '.0f'), _fmt(r['ours'].get('mfu'), '.0%'),
             _fmt(r['ours'].get('xla_over_analytic'), '.3f')] for r in rows]
    parts += ['', table(['Forward+backward (ours, no optimizer)', 'batch', 's', 'GFLOP/s',
                         'MFU', 'XLA/analytic FLOPs'], body)]
  points = results.get('memory', [])
  if points:
    body = []
    for p in points:
      if 'error' in p:
        body.append([p['kind'], _PRECISION_LABEL.get(p.get('precision'), '?'),
                     str(p.get('batch')), str(p.get('seq_len')), '-', p['error'][:60],
                     '', '', '', '', '', '', ''])
        continue
      xla = p['xla']
      body.append([p['kind'], _PRECISION_LABEL[p['precision']], str(p['batch']),
                   str(p['seq_len']), str(p['max_seq_len']), _gb(p['state_bytes']),
                   _gb(xla['temp']), _fmt(p.get('marginal_bytes_per_input_byte'), ',.0f'),
                   _gb(xla['peak']), _fmt(xla['peak'] / p['state_bytes'], '.2f'),
                   _gb(p.get('resident_before_bytes')), _gb(p.get('step_peak_bytes')),
                   _gb(p.get('process_peak_bytes'))])
    parts += ['', table(['Memory', 'precision', 'batch', 'input bytes', 'max_seq_len',
                         'state GB', 'XLA temp GB', 'added temp B per added input B',
                         'XLA peak GB', 'peak/state', 'RSS before step GB',
                         'RSS step peak GB', 'process peak GB'], body)]
  data = results.get('data')
  if data:
    needs = {n['batch']: n for n in data.get('needs', [])}
    body = []
    for rate in data['rates']:
      need = needs.get(rate['batch'])
      body.append([str(rate['batch']), _fmt(rate['batches_per_s'], ',.0f'),
                   _fmt(rate['bytes_per_s'] / 1e6, ',.1f'),
                   _fmt(need['step_s'] if need else None),
                   need['source'] if need else '-',
                   _fmt(need['headroom'] if need else None, ',.0f', 'x')])
    parts += ['', table(['Data pipeline (1 thread)', 'masked batches/s', 'MB/s',
                         'fastest train step s', 'of', 'headroom'], body)]
  verdicts = results.get('targets', [])
  if verdicts:
    parts += ['', 'Targets:']
    for t in verdicts:
      mark = {True: 'met   ', False: 'MISSED', None: 'n/a   '}[t['met']]
      value = '-' if t['value'] is None else f'{t["value"]:.3g}'
      op = '<=' if 'memory' in t['target'] else '>='
      note = f' ({t["note"]})' if t.get('note') else ''
      parts.append(f'  [{mark}] {t["target"]}: {value} (target {op} {t["threshold"]}){note}')
  return '\n'.join(parts)
