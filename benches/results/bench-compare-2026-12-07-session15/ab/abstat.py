import json,sys,glob,statistics as st,collections
d=sys.argv[1]
rows=collections.defaultdict(list)
for f in sorted(glob.glob(d+'/*.jsonl')):
    name=f.split('/')[-1].rsplit('-',1)[0]
    for l in open(f):
        j=json.loads(l)
        if j.get('kind')!='run': continue
        r=j['run']
        if r['engine']!='ferry': continue
        er=r.get('engine_report') or {}
        p=er.get('pages',{})
        rows[(r['workload'] if isinstance(r['workload'],str) else json.dumps(r['workload'])[:40],name)].append((r['total_ms'],r['src_engine_cpu_s'],r['dst_engine_cpu_s'],int(p.get('lz4',0)),int(p.get('zstd',0)),r['status']))
for k,v in sorted(rows.items()):
    t=[x[0] for x in v if x[0]]
    print(k, 'n=%d'%len(v), 'total med %.0f [%s]'%(st.median(t),' '.join('%.0f'%x for x in t)), 'src %.3f dst %.3f'%(st.median([x[1] for x in v]),st.median([x[2] for x in v])), 'lz4',[x[3] for x in v],'zstd',[x[4] for x in v])
